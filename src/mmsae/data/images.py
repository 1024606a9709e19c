"""Load an image set: a Hugging Face dataset saved on disk, a parquet file or folder, or a folder of images.

Reads (an ``s3://`` image set is first downloaded once into the download cache, ``$MMSAE_CACHE_DIR/image_sets``,
keyed by its URI and a fingerprint of its content, so a rewritten one is downloaded afresh; parquet goes
through the ``datasets`` cache, as ``Dataset.from_parquet`` always does; nothing else is written):
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (the toy world's format);
- a ``.parquet`` file, or a directory of ``.parquet`` files (one dataset);
- a directory of image files (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.webp``): column ``image`` and
  ``id`` (the file's path relative to the folder, without extension), files sorted by path.

Every image set must have an ``image`` column of type ``datasets.Image``; anything else is an `ImageSetError`
that names the path and what was found.

Memory stays bounded whatever the image set's size: tables are memory-mapped Arrow files on local disk (the
saved dataset's own files, or the ``datasets`` cache for parquet), never loaded into memory; a plain folder
of images becomes a small table of file paths.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
"""File suffixes read as images when an image set is a plain folder."""


class ImageSetError(ValueError):
    """An image set that cannot be read, lacks an ``image`` column, or has no such split."""


def _pick_split(dd, uri: str, split: str | None):
    names = list(dd.keys())
    if split is None:
        if len(names) == 1:
            return dd[names[0]]
        if "train" in names:
            return dd["train"]
        raise ImageSetError(f"image set {uri} has splits {names} and none is `train`; name one (split=...)")
    if split not in dd:
        raise ImageSetError(f"image set {uri} has no split {split!r}; its splits are {names}")
    return dd[split]


def _check_image_column(ds, uri: str):
    from datasets import Image as HFImage

    if "image" not in ds.column_names:
        raise ImageSetError(
            f"image set {uri} has no `image` column (columns: {ds.column_names}); "
            "expected a dataset with an `image` column of type datasets.Image"
        )
    feature = ds.features["image"]
    if not isinstance(feature, HFImage):
        raise ImageSetError(
            f"image set {uri}: column `image` is {feature!r}, expected datasets.Image "
            "(cast it with ds.cast_column('image', datasets.Image()))"
        )
    return ds


def _from_parquet(paths: list[Path], uri: str):
    import pyarrow as pa
    from datasets import Dataset
    from datasets import Image as HFImage

    # converted once to Arrow files in the datasets cache and memory-mapped from there, never held in memory
    ds = Dataset.from_parquet([str(p) for p in paths], keep_in_memory=False)
    if "image" in ds.column_names and not isinstance(ds.features["image"], HFImage):
        # parquet written without HF metadata: an image struct {bytes, path} or plain paths can be cast
        try:
            ds = ds.cast_column("image", HFImage())
        except (TypeError, ValueError, NotImplementedError, pa.ArrowException) as e:
            raise ImageSetError(
                f"image set {uri}: column `image` ({ds.features['image']!r}) cannot be read as images: {e}"
            ) from e
    return ds


def _from_image_folder(root: Path, files: list[Path]):
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    ids = [str(p.relative_to(root).with_suffix("")) for p in files]
    feats = Features({"id": Value("string"), "image": HFImage()})
    # the table holds the files' paths, not their bytes: its size does not grow with the images'
    return Dataset.from_dict({"id": ids, "image": [str(p) for p in files]}, features=feats)


def load_image_set(uri: str | os.PathLike[str], split: str | None = None):
    """The image set at ``uri`` (local path, ``file://`` or ``s3://``) as a ``datasets.Dataset`` with ``image``.

    ``split`` picks a split of a saved ``DatasetDict`` (required when it has more than one); single-dataset
    formats answer only to None or ``"train"``. An ``s3://`` image set is downloaded once into the download
    cache (keyed by its URI and content fingerprint) and read from there like a local one: memory-mapped,
    not loaded into memory.
    """
    uri = str(uri)
    if uri.startswith("s3://"):
        return _load_local(_fetch_s3(uri), uri, split)
    return _load_local(Path(uri.removeprefix("file://")), uri, split)


def _fetch_s3(uri: str) -> Path:
    from mmsae import storage

    target = storage.cache_dir("image_sets", uri, storage.fingerprint(uri), default_stem="images")
    return storage.download_cached(uri, target)


def _load_local(path: Path, uri: str, split: str | None):
    from datasets import Dataset, DatasetDict, load_from_disk

    if not path.exists():
        raise ImageSetError(f"image set {uri} does not exist")
    if path.is_file():
        if path.suffix != ".parquet":
            raise ImageSetError(
                f"image set {uri} is a file with suffix {path.suffix!r}; expected a .parquet file or a directory"
            )
        ds = _from_parquet([path], uri)
    elif (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        try:
            loaded = load_from_disk(str(path), keep_in_memory=False)
        except (FileNotFoundError, ValueError) as e:
            raise ImageSetError(f"image set {uri} cannot be read with datasets.load_from_disk: {e}") from e
        if isinstance(loaded, DatasetDict):
            ds = _pick_split(loaded, uri, split)
            split = None
        else:
            assert isinstance(loaded, Dataset)
            ds = loaded
    else:
        parquet = sorted(path.rglob("*.parquet"))
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if parquet:
            ds = _from_parquet(parquet, uri)
        elif images:
            ds = _from_image_folder(path, images)
        else:
            raise ImageSetError(
                f"image set {uri} is a directory with no dataset_dict.json/dataset_info.json, no .parquet "
                f"files and no images ({', '.join(IMAGE_SUFFIXES)})"
            )
    if split not in (None, "train"):
        raise ImageSetError(f"image set {uri} is a single dataset; it has no split {split!r}")
    ds = _check_image_column(ds, uri)
    log.info("image set %s: %d rows, columns %s", uri, len(ds), ds.column_names)
    return ds
