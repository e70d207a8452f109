"""The shard access layer and the URL rules: one decode for the loader and the teacher, the
prefetch thread, the nvjpeg fallback logic (run on the CPU), URLs that are never paths, and a
dataset read over http(s).

Data: small ImageFolder trees (JPEG and PNG) and the session's demo set, through our own
ingest. No Ray here (the refresh actor's reading code is called in this process).
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from salient import urls
from salient.errors import SalientError
from salient.jobs.refresh.worker import decoded_batches
from salient.pipeline import shards
from salient.pipeline.adopt import index_shards
from salient.pipeline.ingest import IngestError, ingest_demo, ingest_folder
from salient.pipeline.loader import IMAGENET_MEAN, IMAGENET_STD, LoaderConfig, SalientLoader
from salient.pipeline.manifest import ShardInfo, fingerprint, open_dataset

SIDE = 32


def _image(seed: int, fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 255, (SIDE, SIDE, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """12 images, JPEG (RGB) and PNG (RGBA, converted on decode), in shards of 4."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "src" / "a").mkdir(parents=True)
    for i in range(12):
        fmt, mode, ext = ("JPEG", "RGB", "jpg") if i % 2 else ("PNG", "RGBA", "png")
        (root / "src" / "a" / f"{i:02d}.{ext}").write_bytes(_image(i, fmt, mode))
    ingest_folder(root / "src", root / "data", shard_size=4)
    return root / "data"


def _loader_pixels(data, decode: str) -> dict[int, torch.Tensor]:
    """The loader's images, un-normalised back to uint8, with a crop that is the whole image
    (scale 1, ratio 1, no flip, output size = image size): its decoded pixels before a crop."""
    config = LoaderConfig(
        data=str(data),
        image_size=SIDE,
        patch_size=8,
        batch_size=12,
        strategy="random",
        num_workers=0,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        decode=decode,
    )
    batch = next(SalientLoader(config).epoch(0))
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    pixels = ((batch["images"] * std + mean) * 255).round().to(torch.uint8)
    return dict(zip(batch["ids"].tolist(), pixels))


def _refresh_pixels(data) -> dict[int, torch.Tensor]:
    """What the refresh actor decodes for each id (its own reading code, on the CPU)."""
    dataset, out = open_dataset(data), {}
    for shard in dataset.shards:
        for start, images in decoded_batches(dataset.source(shard), 3, "cpu"):
            for offset, image in enumerate(images):
                out[shard.first_id + start + offset] = image
    return out


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_loader_and_refresh_decode_the_same_pixels(mixed, decode):
    fields = {}
    for sample in shards.iter_samples(open_dataset(mixed).shard_urls()[0]):
        fields[sample["id"]] = shards.image_field(sample)
    assert set(fields.values()) == {"jpg", "png"}  # both formats in the first shard
    loader, refresh = _loader_pixels(mixed, decode), _refresh_pixels(mixed)
    assert sorted(loader) == sorted(refresh) == list(range(12))
    for sample_id, image in refresh.items():
        assert image.shape == (3, SIDE, SIDE) and image.dtype == torch.uint8
        assert torch.equal(loader[sample_id], image), sample_id


def test_iter_samples_reads_only_the_ids_and_fields_asked(demo_data):
    url = open_dataset(demo_data).shard_urls()[1]  # ids 32..63
    samples = list(shards.iter_samples(url, range(40, 43), {"box.json"}))
    assert [s["id"] for s in samples] == [40, 41, 42]
    assert all(set(s) == {"__key__", "__url__", "id", "box.json"} for s in samples)
    images = shards.read_images(url, 60, 6)  # the last 2 ids lie in the next shard
    assert [r is not None for r in images] == [True] * 4 + [False] * 2
    assert images[0][0] == "jpg" and shards.decode_image(images[0][1]).shape == (96, 96, 3)


def test_refresh_batches_follow_the_ids_and_keep_holes(demo_data, tmp_path):
    dataset = open_dataset(demo_data)
    got = list(decoded_batches(dataset.source(dataset.shards[0]), 10, "cpu"))
    assert [start for start, _ in got] == [0, 10, 20, 30]
    assert [len(images) for _, images in got] == [10, 10, 10, 2]
    assert all(im is not None for _, images in got for im in images)
    # an adopted shard whose samples 1 (no image) and 4 (not an image) leave holes
    (tmp_path / "in").mkdir()
    with wds.TarWriter(str(tmp_path / "in" / "a.tar")) as writer:
        for n in range(5):
            image = {1: {}, 4: {"jpg": b"not an image"}}.get(n, {"jpg": _image(n, "JPEG", "RGB")})
            writer.write({"__key__": f"k{n}", "cls": 0, **image})
    index_shards(tmp_path / "in")
    adopted = open_dataset(tmp_path / "in")
    got = list(decoded_batches(adopted.source(adopted.shards[0]), 3, "cpu"))
    assert [[im is not None for im in images] for _, images in got] == [
        [True, False, True],
        [True, False],
    ]


def test_batch_jpeg_decode_falls_back_one_by_one():
    """The nvjpeg path's logic (torchvision's decode on the CPU): one bad file costs itself."""
    good = _image(1, "JPEG", "RGB")
    bad = good[: good.index(b"\xff\xda") + 20]  # header intact, scan cut off
    out = shards.decode_jpegs([good, bad, good], torch.device("cpu"))
    assert [o is not None for o in out] == [True, False, True]
    assert out[0].shape == (3, SIDE, SIDE)
    assert shards.decode_images([None, ("png", b"junk"), ("jpg", good)])[:2] == [None, None]


def test_prefetch_keeps_order_raises_and_stops():
    assert list(shards.prefetched(iter(range(50)), depth=3)) == list(range(50))
    assert list(shards.prefetched(iter(range(5)), depth=0)) == list(range(5))

    def failing():
        yield 1
        raise ValueError("broken shard")

    with pytest.raises(ValueError, match="broken shard"):
        list(shards.prefetched(failing(), depth=2))
    produced = []
    started = threading.Event()

    def endless():
        for i in range(10**6):
            produced.append(i)
            started.set()
            yield i

    stream = shards.prefetched(endless(), depth=2)
    assert next(stream) == 0
    stream.close()  # the consumer stops: the producer stops at its next item
    count = len(produced)
    assert started.wait(5) and count < 10 and len(produced) <= count + 1


# ---------------------------------------------------------------- URLs


def test_urls_are_never_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert urls.normalise("s3://bucket/d/") == "s3://bucket/d"
    assert urls.normalise("file://" + str(tmp_path / "x")) == str(tmp_path / "x")
    assert urls.normalise("rel/d") == str(tmp_path / "rel" / "d")
    assert (
        urls.is_remote("gs://b/x") and not urls.is_remote("file:///x") and not urls.is_remote("a")
    )
    assert urls.join("s3://b/d", "manifest.json") == "s3://b/d/manifest.json"
    with pytest.raises(urls.StorageError, match="unknown URL scheme 'nope'"):
        urls.normalise("nope://b/d")
    with pytest.raises(urls.StorageError, match="read-only"):
        ingest_demo("http://127.0.0.1:9/d", n=2, image_size=32)
    with pytest.raises(IngestError, match="SRC s3://b/src must be a local folder"):
        ingest_folder("s3://b/src", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" or "http:"


def test_a_scheme_without_its_client_names_the_extra():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here; the message is for environments without it")
    with pytest.raises(urls.StorageError, match=r"pip install 'salient\[gcs\]'"):
        open_dataset("gs://bucket/data")


def test_storage_options_parse_and_never_print():
    options = urls.parse_storage_options(["key=abc", "secret=s3cr3t", "anon=false", "n=3"])
    assert options == {"key": "abc", "secret": "s3cr3t", "anon": False, "n": 3}
    with pytest.raises(urls.StorageError, match="KEY=VALUE"):
        urls.parse_storage_options(["novalue"])
    carried = urls.StorageOptions(options)
    for text in (repr(carried), str(carried), json.dumps({"o": carried}, default=str)):
        assert "s3cr3t" not in text and "abc" not in text and "secret" in text
    previous = urls.storage_options()
    try:
        urls.adopt(carried)
        assert urls.storage_options() == options
    finally:
        urls.set_storage_options(previous)


# ---------------------------------------------------------------- http(s), read-only


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request otherwise
        pass


@pytest.fixture(scope="module")
def http_data(demo_data):
    """The demo set served over http from 127.0.0.1 (a thread; stopped at the end)."""
    handler = functools.partial(_Quiet, directory=str(demo_data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


def test_a_dataset_over_http_reads_like_a_local_one(http_data, demo_data):
    remote, local = open_dataset(http_data), open_dataset(demo_data)
    assert remote.fingerprint == local.fingerprint and remote.root == http_data
    url = remote.shard_urls()[2]
    assert url == f"{http_data}/shard-000002.tar"
    got = shards.read_images(url, 64, 32)
    assert got == shards.read_images(local.shard_urls()[2], 64, 32)
    config = LoaderConfig(
        data=http_data, image_size=32, patch_size=8, batch_size=32, num_workers=0, strategy="random"
    )
    assert len(list(SalientLoader(config).epoch(0))) == 3


# ---------------------------------------------------------------- the pixel budget

PEAK = """
import json, os, resource, sys, threading, time

def _hwm() -> int:  # this process's high-water mark of resident memory, in bytes
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a child
    # of a large pytest process starts at its parent's peak and shows no growth at all
    try:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

_sampled = [0]

def _sample() -> None:  # resident memory every 2 ms: a third view of the peak
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        with open("/proc/self/statm") as statm:
            _sampled[0] = max(_sampled[0], int(statm.read().split()[1]) * page)
        time.sleep(0.002)

threading.Thread(target=_sample, daemon=True).start()
time.sleep(0.05)

def peak() -> int:
    return max(_hwm(), _sampled[0])
"""

CALIBRATE = (
    PEAK
    + """
before = peak()
block = bytearray(b"\\x01" * int(sys.argv[1]))  # written: every page resident
time.sleep(0.05)
print(json.dumps({"grew": peak() - before}))
"""
)

MEMORY_PROBE = (
    PEAK
    + """
from salient.pipeline import shards
from salient.pipeline.manifest import DatasetError, open_dataset

image, dataset, readers = open(sys.argv[1], "rb").read(), sys.argv[2], sys.argv[3].split(",")
calls = {  # every reader's decode: loader workers, the loader's device path, refresh / eval, inspect
    "open_rgb": lambda data: shards.open_rgb(data),
    "image_hw": lambda data: shards.image_hw(data),
    "decode_images": lambda data: shards.decode_images([("png", data)])[0],
    "decode_image": lambda data: shards.decode_image(data),
}
small = open(sys.argv[4], "rb").read()
for name in readers:  # warm: lazy imports and PIL's plugins load before the measure
    calls[name](small)
before, decoded, error = peak(), {}, None
try:
    open_dataset(dataset)
except DatasetError as exc:
    error = str(exc)
for name in readers:
    decoded[name] = calls[name](image) is not None
time.sleep(0.05)
print(json.dumps({"grew": peak() - before, "decoded": decoded, "error": error}))
"""
)


def _python(code: str, *args: str, **env) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


def _probe(huge: Path, dataset: Path, small: Path, readers: str, **env) -> dict:
    """Peak memory growth of a fresh process while it opens ``dataset`` and decodes ``huge``
    through ``readers``: the larger of the kernel's high-water mark (VmHWM) and resident
    memory sampled every 2 ms."""
    return _python(MEMORY_PROBE, str(huge), str(dataset), readers, str(small), **env)


def test_a_huge_png_and_a_5e7_manifest_stay_within_the_documented_memory_bound(
    huge_png, demo_data, tmp_path
):
    hostile = tmp_path / "hostile"
    shutil.copytree(demo_data, hostile)
    body = json.loads((hostile / "manifest.json").read_text())
    body["shards"][2]["count"] = body["shard_size"] = 50_000_000  # in a ~250 KB shard
    body["num_samples"] = 64 + 50_000_000
    infos = [ShardInfo(**s) for s in body["shards"]]
    body["fingerprint"] = fingerprint(infos, body["num_samples"])
    (hostile / "manifest.json").write_text(json.dumps(body))
    small = tmp_path / "small.png"
    small.write_bytes(_image(0, "PNG", "RGB"))
    bound = 8 * shards.MAX_PIXELS  # the documented bound of one decode (pipeline/shards.py)
    assert bound < 13000 * 13000 * 3  # decoding the PNG whole would break it
    if _python(CALIBRATE, str(2 * bound))["grew"] < bound:
        pytest.skip("this machine reports no peak memory (VmHWM and VmRSS stay flat)")
    readers = "open_rgb,image_hw,decode_images,decode_image"
    got = _probe(huge_png, hostile, small, readers)
    assert got["decoded"] == dict.fromkeys(readers.split(","), False)  # refused: corrupt
    assert "claims 50000000 samples in" in got["error"]
    assert got["grew"] < bound, got
    # the same measure sees a decode that the budget lets through: the bound can fail
    raised = _probe(huge_png, demo_data, small, "open_rgb", SALIENT_MAX_PIXELS="200000000")
    assert raised["decoded"] == {"open_rgb": True} and raised["error"] is None
    assert raised["grew"] > bound, raised


READER_PROBE = (
    PEAK
    + """
from salient.jobs.eval.worker import FeatureSpec, eval_crop, read_shard_images
from salient.jobs.refresh.worker import decoded_batches, teacher_view
from salient.jobs.runtime.shard_pool import ActorInputs
from salient.pipeline.manifest import open_dataset

dataset, viewed, reader = open_dataset(sys.argv[1]), sys.argv[2] == "view", sys.argv[3]
inputs = ActorInputs(32, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
if reader == "eval":  # a whole shard
    view = (lambda im: eval_crop(im, FeatureSpec(inputs, 0.875))) if viewed else None
    read = lambda source: read_shard_images(source, "cpu", view)
else:  # refresh: a batch of 16
    view = teacher_view(inputs) if viewed else None
    read = lambda source: list(decoded_batches(source, 16, "cpu", view))
read(dataset.source(dataset.shards[-1]))  # warm: lazy imports and PIL's plugins
before = peak()
held = read(dataset.source(dataset.shards[0]))
print(json.dumps({"grew": peak() - before}))
"""
)


def test_a_reader_holds_views_of_a_shard_not_its_full_size_images(tmp_path):
    # Eval holds a whole shard and refresh a batch of 16: as their views (taken right after
    # each decode) a shard of 16 images of 3000 x 3000 px grows a reader by one image's decode
    # and view (under 32 bytes a pixel: docs/ARCHITECTURE.md "Pixel budget"), where the
    # images themselves are 432 MB.
    side, count = 3000, 16
    root = tmp_path / "big" / "cls"
    root.mkdir(parents=True)
    for k in range(count):
        pixels = np.full((side, side, 3), (k * 20, 90, 200 - k * 10), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{k}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "tiny.png")  # the warm shard
    ingest_folder(tmp_path / "big", tmp_path / "data", shard_size=count)
    if _python(CALIBRATE, str(200 * 2**20))["grew"] < 100 * 2**20:
        pytest.skip("this machine reports no peak memory (VmHWM and VmRSS stay flat)")
    one, images, data = 32 * side * side, count * side * side * 3, str(tmp_path / "data")
    for reader in ("eval", "refresh"):
        viewed = _python(READER_PROBE, data, "view", reader)["grew"]
        assert viewed < one, (reader, viewed)
        whole = _python(READER_PROBE, data, "whole", reader)["grew"]  # the measure can fail
        assert whole > images * 0.9, (reader, whole)


def _gradient_jpeg(width: int, height: int) -> bytes:
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_a_jpeg_over_the_budget_decodes_at_a_reduced_scale_in_every_reader(monkeypatch):
    jpeg = _gradient_jpeg(1200, 1000)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, format="PNG")
    png = buffer.getvalue()
    whole = shards.decode_image(jpeg)  # the default budget: decoded whole
    assert whole.shape == (1000, 1200, 3)
    monkeypatch.setenv("SALIENT_MAX_PIXELS", "500000")  # 1.2 M pixels: 1/2 scale fits
    image = shards.open_rgb(jpeg)
    assert image.size == (600, 500) and shards.image_hw(jpeg) == (500, 600)
    pixels = shards.decode_image(jpeg)
    halved = np.asarray(Image.fromarray(whole).reduce(2), dtype=np.float32)  # an independent 1/2
    assert pixels.shape == (500, 600, 3) and np.abs(pixels - halved).mean() < 2.0
    assert torch.equal(shards.decode_images([("jpg", jpeg)])[0], shards.as_tensor(pixels))
    for reader in (shards.open_rgb, shards.image_hw, shards.decode_image):
        assert reader(png) is None  # no draft for a PNG: refused
    with pytest.raises(shards.ImageRejected, match="1200×1000 = 1,200,000 pixels is over"):
        shards.open_image(png)
    monkeypatch.setenv("SALIENT_MAX_PIXELS", "10000")  # even 1/8 (150 × 125) is over
    assert shards.open_rgb(jpeg) is None and shards.decode_images([("jpg", jpeg)]) == [None]
    monkeypatch.setenv("SALIENT_MAX_PIXELS", "lots")
    with pytest.raises(SalientError, match="SALIENT_MAX_PIXELS='lots' must be a positive"):
        shards.open_rgb(jpeg)


def test_ingest_skips_an_image_over_the_budget_with_its_reason(huge_png, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(huge_png, src / "huge.png")
    (src / "small.jpg").write_bytes(_image(1, "JPEG", "RGB"))
    with pytest.warns(UserWarning, match="huge.png"):
        manifest = ingest_folder(src, tmp_path / "out")
    assert manifest.num_samples == 1
    (skipped,) = manifest.skipped
    assert skipped["path"] == "huge.png"
    assert "13000×13000 = 169,000,000 pixels is over the pixel budget" in skipped["reason"]


def test_the_ingest_job_says_once_why_it_skips_an_image_over_the_budget(huge_png, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(huge_png, src / "huge.png")
    (src / "small.jpg").write_bytes(_image(1, "JPEG", "RGB"))
    salient = str(Path(sys.executable).with_name("salient"))  # a real process: pytest's own
    run = subprocess.run(  # capture of warnings would hide PIL's
        [salient, "ingest", str(src), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and "skipping huge.png: 13000×13000" in err[0], err  # not PIL's too
