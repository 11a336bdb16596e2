"""tierlm: run language models larger than your memory, as fast as the hardware allows."""
from tierlm.engine.output import RequestOutput
from tierlm.engine.llm import LLM
from tierlm.engine.sampler import SamplingParams
from tierlm.errors import ContextLengthError, ModelFormatError, TierlmError, UnsupportedModelError, UsageError

__all__ = ["LLM", "SamplingParams", "RequestOutput", "TierlmError", "ModelFormatError", "UnsupportedModelError",
           "UsageError", "ContextLengthError"]
__version__ = "0.1.0"
