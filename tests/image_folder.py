"""Small generated image folders for the training-command tests: three visually distinct
classes (40x40 RGB, per-image noise and a random shift)."""

from pathlib import Path

import numpy as np

CLASSES = ("blue_checks", "green_stripes", "red_plain")  # sorted, as the folders are read


def _image(kind: str, rng) -> np.ndarray:
    yy, xx = np.mgrid[0:40, 0:40] + rng.integers(0, 8, size=2)[:, None, None]
    img = np.zeros((40, 40, 3), np.float64)
    if kind == "red_plain":
        img[:] = (230, 30, 30)
    elif kind == "green_stripes":
        img[:] = np.where(((yy // 4) % 2)[..., None] == 0, (30, 210, 40), (250, 250, 250))
    else:
        img[:] = np.where((((yy // 5) + (xx // 5)) % 2)[..., None] == 0, (20, 30, 220), (240, 240, 60))
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: Path, per_class: int, classes=CLASSES, seed: int = 0) -> Path:
    """root/<class>/<class>_<i>.png, ``per_class`` images each; returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(c, rng)).save(root / c / f"{c}_{i:02d}.png")
    return root


def truncated_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG cut to half its bytes: its header parses (``Image.verify`` passes), its pixels
    do not decode."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_image("red_plain", np.random.default_rng(seed))).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path
