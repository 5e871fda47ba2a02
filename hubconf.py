"""torch.hub entry points: ``torch.hub.load(REPO_DIR, "t3d121", source="local", weights=PATH)``.

``weights`` is a local file (a ``t3d train`` checkpoint, a transfer export or a bare state_dict); nothing is
downloaded. The number of classes is read from the file's classifier unless ``num_classes`` is given. The model is
returned in eval mode when weights are loaded, with ``model.t3d_meta`` holding the checkpoint's metadata (classes,
clip, ...) when it has any.
"""

dependencies = ["torch"]


def _load(name: str, weights: str | None, num_classes: int | None, backend: str, **kwargs):
    import os

    from t3d.checkpoint import extract_state_dict, load_checkpoint
    from t3d.models import MODELS

    if weights is None:
        return MODELS[name](num_classes=num_classes or 400, backend=backend, **kwargs)
    if "://" in str(weights) or not os.path.isfile(weights):
        raise ValueError(f"weights: expected a local weights file (no downloads), got {weights!r}")
    loaded = load_checkpoint(weights)
    state = extract_state_dict(loaded)
    classes = int(state["classifier.weight"].shape[0]) if "classifier.weight" in state else 400
    model = MODELS[name](num_classes=num_classes or classes, backend=backend, **kwargs)
    model.load_state_dict(state)
    model.t3d_meta = dict(loaded.get("meta") or {})
    return model.eval()


def t3d121(weights: str | None = None, num_classes: int | None = None, backend: str = "auto", **kwargs):
    """T3D-121 (DenseNet-121-3D with TTLs); ``weights``: a local file."""
    return _load("t3d121", weights, num_classes, backend, **kwargs)


def t3d169(weights: str | None = None, num_classes: int | None = None, backend: str = "auto", **kwargs):
    """T3D-169; ``weights``: a local file."""
    return _load("t3d169", weights, num_classes, backend, **kwargs)


def t3d_tiny(weights: str | None = None, num_classes: int | None = None, backend: str = "auto", **kwargs):
    """The tiny test network; ``weights``: a local file."""
    return _load("t3d_tiny", weights, num_classes, backend, **kwargs)
