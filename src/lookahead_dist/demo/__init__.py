"""The ``lookahead-dist`` demo: a small byte-level transformer LM trained on Python's own docs.

One concern per module:

- :mod:`.data`: the text (``pydoc_data.topics``), byte tokens, deterministic per-rank batches;
- :mod:`.model`: the transformer (torch.nn only);
- :mod:`.config`: :class:`RunConfig`, what one run trains, validated;
- :mod:`.modes`: ddp / zero2 / fsdp2 / local-sgd set-ups behind one interface;
- :mod:`.commcount`: bytes communicated, counted where collectives reach the dispatcher;
- :mod:`.train`: the per-rank loop and its numbers;
- :mod:`.launch`: spawning local ranks (or joining torchrun);
- :mod:`.report`: the summary table.

The command line is :mod:`lookahead_dist.cli`. Nothing here is imported by the library itself.
"""

from .config import RunConfig
from .model import ModelConfig, TinyLM

__all__ = ["ModelConfig", "RunConfig", "TinyLM"]
