"""Decoding one image: a PIL image from a Hugging Face dataset → a ``uint8`` array, and the one-line error that
names the row and file of an image that cannot be decoded (corrupt, truncated, not an image at all).

Shared by the in-memory sources (:mod:`sslbench.data.sources`) and the lazy images (:mod:`sslbench.data.lazy`),
which both decode exactly the same way.
"""

from __future__ import annotations

import numpy as np

from sslbench.core.errors import UserError


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text[:limit]


def to_array(image, mode: str, resize: int | None, resize_mode: str) -> np.ndarray:
    """One PIL image → ``uint8`` array (H, W) or (H, W, 3), converted and optionally resized to a square."""
    from PIL import Image

    image = image.convert(mode)
    if resize is not None and image.size != (resize, resize):
        w, h = image.size
        if resize_mode == "squash":
            image = image.resize((resize, resize), Image.Resampling.BICUBIC)
        else:  # keep the aspect ratio: shorter side to `resize`, then the central square
            scale = resize / min(w, h)
            nw, nh = max(resize, round(w * scale)), max(resize, round(h * scale))
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - resize) // 2, (nh - resize) // 2
            image = image.crop((left, top, left + resize, top + resize))
    return np.asarray(image, dtype=np.uint8)


def undecodable(ds, column: str, row: int, exc: BaseException, what: str) -> UserError:
    """The one-line error for an image that cannot be decoded (corrupt, truncated, not an image), naming its row
    and, when the dataset knows it, its file."""
    where = f"image {row}"
    try:
        from datasets import Image

        raw = ds.cast_column(column, Image(decode=False))[int(row)][column]
        if isinstance(raw, dict) and raw.get("path"):
            where += f" ({raw['path']})"
    except Exception:  # the file name is a courtesy; the row number is enough
        pass
    return UserError(f"{what}: {where} cannot be decoded ({type(exc).__name__}: {_first_line(exc)}); "
                     "remove or replace the file")


def decode_rows(ds, column: str, rows: list[int], what: str) -> list:
    """``ds[rows][column]`` (decoded PIL images); an undecodable image becomes :func:`undecodable`'s error."""
    contiguous = bool(rows) and rows == list(range(rows[0], rows[0] + len(rows)))
    try:
        return ds[slice(rows[0], rows[0] + len(rows)) if contiguous else rows][column]
    except UserError:
        raise
    except Exception:  # find which row: decode them one at a time
        for row in rows:
            try:
                ds[int(row)][column]
            except Exception as exc:
                raise undecodable(ds, column, row, exc, what) from None
        raise


def to_array_checked(ds, column: str, row: int, image, mode: str, resize: int | None, resize_mode: str,
                     what: str) -> np.ndarray:
    """:func:`to_array`, with a truncated image (PIL reads pixels lazily) reported as :func:`undecodable`."""
    try:
        return to_array(image, mode, resize, resize_mode)
    except Exception as exc:
        raise undecodable(ds, column, row, exc, what) from None
