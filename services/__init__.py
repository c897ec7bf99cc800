"""glmserve: disaggregated prefill/decode serving for the GLM-4.x model family."""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import glmserve.operator` (operator image, no torch) does not pull torch in.
    if name == "LLM":
        from glmserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from glmserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
