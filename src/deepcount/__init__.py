"""DeepCount: Deep Density-aware Count Regressor (Chen, "Deep Density-aware Count Regressor").

A VGG16 frontend and a strided-conv backbone regress one global count from a 384x512 crop;
five density-map branches feed gradients into the backbone during training ("gradient
fusion") and are run at inference only when a density map is asked for.
"""

__version__ = "0.1.0"

__all__ = ["Counter", "CountResult", "__version__"]


def __getattr__(name: str):
    """``Counter`` and ``CountResult`` (the public entry point), imported on first use so that
    importing the package (the command line's ``--help``, a submodule) does not import torch."""
    if name in ("Counter", "CountResult"):
        from . import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'deepcount' has no attribute {name!r}")
