"""Image preprocessing for folder sources and image-file listing."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's (guided-diffusion) preprocessing: box-halve while the short side >= 2*size, bicubic
    resize so the short side is `size`, then centre crop to size x size. Returns uint8 (size, size, 3)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        # Repeated 2x box filtering anti-aliases large downscales better than one bicubic step.
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def load_and_crop(path: str, size: int) -> np.ndarray:
    """Decode an image file and apply `center_crop_arr`; errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return center_crop_arr(image, size)
    except Exception as e:
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def list_images(root: str) -> list[str]:
    """Image files under `root` (recursive), sorted for a reproducible order."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        found += [os.path.join(directory, f) for f in sorted(files) if f.lower().endswith(IMAGE_FILE_EXTENSIONS)]
    return found


def list_labelled_images(root: str) -> tuple[list[str], list[int], list[str] | None]:
    """(paths, labels, class names): class sub-folders give labels (sorted names -> 0..C-1);
    a folder with images but no sub-folders is unlabelled (labels all 0, class names None)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory")
    entries = sorted(os.listdir(root))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    loose = [e for e in entries if e.lower().endswith(IMAGE_FILE_EXTENSIONS)]
    if classes and loose:
        raise ValueError(f"{root}: has both class sub-folders ({classes[:3]}...) and loose images "
                         f"({loose[:3]}...); expected one or the other")
    if not classes:
        paths = list_images(root)
        if not paths:
            raise FileNotFoundError(f"{root}: no image files ({', '.join(IMAGE_FILE_EXTENSIONS)})")
        return paths, [0] * len(paths), None
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_images(os.path.join(root, name))
        if not files:
            raise FileNotFoundError(f"{os.path.join(root, name)}: class folder without image files")
        paths += files
        labels += [label] * len(files)
    return paths, labels, classes
