"""Regenerate the sample photos in this folder from scikit-image's bundled data (see LICENSES.md).

    .venv/bin/python assets/images/make_samples.py

Each photo is saved as a JPEG (quality 90) at its original size, at most 640 px on the long side.
"""
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SAMPLES = {  # our name -> scikit-image loader
    "cat": "chelsea",
    "astronaut": "astronaut",
    "coffee": "coffee",
    "rocket": "rocket",
}


def main() -> None:
    from skimage import data

    for name, loader in SAMPLES.items():
        image = Image.fromarray(getattr(data, loader)()).convert("RGB")
        image.thumbnail((640, 640), Image.Resampling.LANCZOS)
        image.save(HERE / f"{name}.jpg", quality=90, optimize=True)
        print(name, image.size, (HERE / f"{name}.jpg").stat().st_size)


if __name__ == "__main__":
    main()
