"""Deterministic, resumable webdataset reader for distributed training.

``build_shard_loader`` returns a ``torch.utils.data.DataLoader`` whose batches are dicts::

    image   float32 [B, 3, H, W]   transformed images
    label   int64   [B]            ``cls`` of each sample (-1 when the shard has none)
    skipped int64   [B]            1 where the sample's own image could not be decoded and the
                                   slot was filled with another image; ``skipped.sum()`` is the
                                   number of undecodable samples since the worker's previous batch

How samples are split (all of it is a pure function of seed, epoch, rank, world size, the
DataLoader's worker count and the shards, so every rank computes the same plan without talking):

1. The shard list is shuffled with (seed, epoch), identically on all ranks.
2. Shards are dealt to ranks (``shards[rank::world_size]``), then each rank's shards to its
   workers. When there are fewer shards than ranks (or than a rank's workers) that level splits
   at the sample level instead: every reader walks the same shards and keeps every k-th sample.
   Either way, different ranks and workers read different samples.
3. Each worker reads its shards in order, cycling over them when it runs short, through a shuffle
   buffer seeded with (seed, epoch, rank, worker), and cuts the stream into batches of exactly
   ``batch_size`` raw samples.
4. Every rank yields exactly ``steps_per_epoch`` batches (default: ``epoch_samples`` //
   (batch_size * world_size)), so DDP ranks never wait on one another at the end of an epoch.
   Worker ``w`` of ``W`` produces the batches ``i`` with ``i % W == w``; the DataLoader's
   round-robin then returns them in order ``0, 1, 2, ...``.
5. Before the transform, python ``random``, numpy and torch's CPU generator are seeded from
   (seed, epoch, pass, sample key, copy), so a sample's augmentation does not depend on worker count
   or on resuming. The caller's RNG states are restored afterwards.
6. ``start_step=k`` drops the raw (undecoded) samples of batches ``0..k-1`` and rotates the
   worker roles so that worker 0 produces batch ``k``: the resumed batches equal batches
   ``k, k+1, ...`` of the uninterrupted epoch exactly (same ``num_workers`` required).

Repeated augmentation (``repeats=r``, DeiT's ``RASampler`` as the authors' stage-1/2 script uses it
with r = 3): RASampler repeats every index of the epoch's permutation r times in a row and deals the
list round-robin to ranks, so the r views of an image land on r consecutive ranks. Here the same is
done at shard level, before step 2: the epoch's shard order becomes the list of (shard, copy) pairs
``s0c0, s0c1, ..., s0c(r-1), s1c0, ...`` and that list is dealt to ranks and workers as above, so the
copies of a shard go to consecutive ranks (all different when world_size >= r) and every (key, copy)
is read by exactly one reader. A reader holding several copies of a shard in a row reads the tar once
and emits each sample once per copy. The copy index joins the augmentation seed, so each view is
augmented independently (copy 0 keeps the plain reader's seed). Where it differs from RASampler: a
stream cannot permute images globally, so images are grouped by shard (and mixed only within the
shuffle buffers); and the epoch is cut after ``steps_per_epoch`` batches, counted as RASampler
counts (``epoch_samples``: about N views, not r·N). All copies of a shard sit at the same depth of
their readers' lists, so an epoch reads the first ~1/r of its shard order with all r views, except
near each reader's cut (about a shard plus a shuffle buffer), where some images get fewer views
(RASampler: at most one image). Resume is exact as before (the copies are ordinary stream items).
``repeats=1`` is the plain reader, unchanged.

An undecodable image never shifts the stream (that would break exact resume): its slot is filled
with the nearest decodable sample of the same batch (searching forward), or, if the whole batch is
bad, the next decodable sample after it, augmented with the bad sample's own seed. It is counted
in ``skipped`` and logged once per key.

Total samples come from, in order: the ``num_samples`` argument, the index JSON written by
``gkd.data.shards.write_shards`` (found beside the shards), or counting the members of every local
tar (reads all tar headers once; remote shards need an index or ``num_samples``). When an index is
known, each shard's sample count is checked as it is read, which also catches truncated tars (a tar
cut short reads as a shorter valid one: Python's tarfile stops quietly at a partial header); without
one, a local shard's tar headers are checked after it is read.

A shard that cannot be read raises ``ShardReadError`` (a ``gkd.errors.GKDError``) naming it, also
from a DataLoader worker: the worker hands the message to the main process, whose loader raises it
as it is (torch would re-raise it wrapped in the worker's whole traceback). ``check_shards`` (behind
``gkd data verify``) reads every shard fully before a long run and reports each bad one.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import itertools
import logging
import os
import random
import re
import tarfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gkd.data.shards import ShardIndex
from gkd.errors import GKDError

logger = logging.getLogger(__name__)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "img", "image")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_MAX_LOOKAHEAD = 10_000  # raw samples searched for a donor when a whole batch is undecodable
RA_ROUND = 256  # RASampler rounds the epoch down to a multiple of this many samples
_REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "sftp://", "scp://", "ais://")
_VERIFY_HINT = "`gkd data verify` checks every shard"

ShardSpec = str | os.PathLike | Sequence[str | os.PathLike]


class ShardReadError(GKDError, RuntimeError):
    """A shard is missing, truncated or not a valid tar. The message names the shard (one line)."""


# ============================================================================ shard resolution

@dataclass
class ShardSet:
    """Resolved shard URLs; ``counts[i]`` = samples in ``urls[i]`` (None when not known)."""

    urls: list[str]
    counts: list[int] | None = None
    declared_samples: int | None = None
    classes: list[str] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)  # dataset splits recorded by the indexes (ShardIndex.sources)

    @property
    def num_samples(self) -> int | None:
        if self.declared_samples is not None:
            return self.declared_samples
        return None if self.counts is None else int(sum(self.counts))


def _is_local(url: str) -> bool:
    return not url.startswith(_REMOTE_PREFIXES)


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _check_exist(urls: Sequence[str]) -> None:
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(_local_path(u))]
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        hint = ""
        if any(c in u for u in missing for c in "*?["):  # braceexpand does not glob
            hint = " (wildcards are not expanded: give a brace pattern, a folder or an index JSON)"
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist: {shown}{hint}")


def _from_index(path: str) -> ShardSet:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard index not found: {path}")
    index = ShardIndex.load(path)
    return ShardSet(urls=index.shard_paths, counts=list(index.counts), classes=list(index.classes),
                    sources=list(index.sources))


def _from_dir(path: str) -> ShardSet:
    indexes = sorted(glob.glob(os.path.join(path, "*-index.json")))
    if len(indexes) == 1:
        return _from_index(indexes[0])
    if len(indexes) > 1:
        raise ValueError(f"{path} holds several shard indexes ({', '.join(map(os.path.basename, indexes))}); "
                         "pass one of them")
    urls = sorted(glob.glob(os.path.join(path, "*.tar")))
    if not urls:
        raise FileNotFoundError(f"no *.tar shards and no *-index.json in {path}")
    return ShardSet(urls=urls)


def _counts_from_neighbour_indexes(urls: Sequence[str]) -> tuple[list[int] | None, list[str], list[dict]]:
    """Per-shard counts, classes and dataset sources from ``*-index.json`` files in the shards' folders
    (counts only if they cover all shards)."""
    counts, classes, sources = _neighbour_indexes(urls)
    return (None, [], sources) if any(c is None for c in counts) else (counts, classes, sources)


def _neighbour_indexes(urls: Sequence[str]) -> tuple[list[int | None], list[str], list[dict]]:
    """``_counts_from_neighbour_indexes`` with a count per shard (None: no index lists it)."""
    known: dict[str, int] = {}
    classes: list[str] = []
    sources: list[dict] = []
    wanted = {os.path.abspath(_local_path(u)) for u in urls}
    for folder in sorted({os.path.dirname(os.path.abspath(_local_path(u))) for u in urls if _is_local(u)}):
        for ipath in sorted(glob.glob(os.path.join(folder, "*-index.json"))):
            try:
                index = ShardIndex.load(ipath)
            except (ValueError, KeyError, OSError):
                continue
            classes = classes or list(index.classes)
            known.update({os.path.abspath(p): c for p, c in zip(index.shard_paths, index.counts)})
            if wanted & {os.path.abspath(p) for p in index.shard_paths}:
                sources += [s for s in index.sources if s not in sources]
    return [known.get(os.path.abspath(_local_path(u))) for u in urls], classes, sources


# ============================================================================ tar integrity

_BLOCK = tarfile.BLOCKSIZE
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these members
_BYTESIO = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass
class TarScan:
    """What one walk over a local tar found: ``samples`` as webdataset groups them (consecutive
    members sharing a key), the keys of samples without an image field or with an undecodable one,
    and ``problem``: why the tar itself is bad (unreadable, cut short), or ``""``."""

    samples: int = 0
    no_image: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)  # "key: error"
    problem: str = ""


def _reason(exc: BaseException) -> str:
    """``Type: message`` without the `` @ <stream>`` webdataset appends to the message."""
    text = str(exc.args[0]) if exc.args else str(exc)
    return f"{type(exc).__name__}: {text.split(' @ ')[0]}"


def scan_tar(url: str, *, read: bool = False, decode: bool = False) -> TarScan:
    """Walk one local tar member by member: count samples, check that every sample has an image
    field, that every member lies inside the file and that the end-of-archive block follows the
    last one (tarfile ends quietly at a partial or garbled header, so a cut tar would look
    complete). ``read`` also reads every member's bytes; ``decode`` decodes every image."""
    scan = TarScan()
    key: str | None = None
    fields: dict[str, bytes | None] = {}
    path = _local_path(url)

    def close_sample() -> None:
        if key is None:
            return
        scan.samples += 1
        image = next((k for k in IMAGE_FIELDS if k in fields), None)
        if image is None:
            scan.no_image.append(key)
        elif decode:
            try:
                decode_image({image: fields[image]})
            except _DECODE_ERRORS as exc:  # PIL names the in-memory file: noise in a report
                scan.undecodable.append(f"{key}: {type(exc).__name__}: {_BYTESIO.sub('', str(exc))}")

    last, end = "", 0
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                last, end = member.name, member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                name = member.name
                if not member.isreg() or _SKIP_META.match(name) or (
                        "/" not in name and name.startswith("__") and name.endswith("__")):
                    continue
                prefix, suffix = wds.tariterators.base_plus_ext(name)
                if prefix is None:
                    continue
                if prefix != key:
                    close_sample()
                    key, fields = prefix, {}
                data = tar.extractfile(member).read() if read or decode else None
                fields[suffix.lower()] = data
                tar.members = []  # keep memory flat over big shards (tarfile lists every member)
            close_sample()
            f.seek(end)
            tail = f.read(_BLOCK)
    except (tarfile.TarError, OSError, EOFError) as exc:
        after = f" after {scan.samples} samples" if scan.samples else ""
        scan.problem = f"unreadable{after} (truncated or not a tar?): {_reason(exc)}"
        return scan
    if len(tail) < _BLOCK or tail.count(0) != _BLOCK:
        scan.problem = (f"truncated or corrupt after {scan.samples} samples (no end-of-archive block after "
                        f"member {last})")
    return scan


def count_tar_samples(url: str) -> int:
    """Number of samples in one local tar (as the reader groups them); reads every member header
    and raises ``ShardReadError`` for a tar that is cut short or unreadable."""
    scan = scan_tar(url)
    if scan.problem:
        raise ShardReadError(f"shard {url}: {scan.problem}; {_VERIFY_HINT}")
    return scan.samples


def _resolve(spec: ShardSpec) -> ShardSet:
    """The URLs (and an index's counts) a spec names, unchecked."""
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if os.path.isdir(s):
            shard_set = _from_dir(s)
        elif s.endswith(".json"):
            shard_set = _from_index(s)
        else:
            shard_set = ShardSet(urls=list(braceexpand(s)))
    else:
        shard_set = ShardSet(urls=[u for item in spec for u in braceexpand(os.fspath(item))])
    if not shard_set.urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return shard_set


def resolve_shards(spec: ShardSpec, num_samples: int | None = None) -> ShardSet:
    """Turn a shard spec into a checked ``ShardSet``.

    ``spec``: a brace pattern (``dir/train-{000000..000012}.tar``), a list of paths/patterns, a
    folder (its single ``*-index.json``, else all its ``*.tar``) or an index JSON. Missing local
    shards raise ``FileNotFoundError`` naming them.
    """
    shard_set = _resolve(spec)
    _check_exist(shard_set.urls)
    if shard_set.counts is None:
        shard_set.counts, shard_set.classes, shard_set.sources = _counts_from_neighbour_indexes(shard_set.urls)
    if num_samples is not None:
        shard_set.declared_samples = int(num_samples)
    elif shard_set.counts is None:
        remote = [u for u in shard_set.urls if not _is_local(u)]
        if remote:
            raise ValueError(f"cannot count samples in remote shards (e.g. {remote[0]}): "
                             "pass num_samples or use an index JSON")
        logger.info("no shard index found: counting samples in %d shards", len(shard_set.urls))
        shard_set.counts = [count_tar_samples(u) for u in shard_set.urls]
    return shard_set


def count_samples(spec: ShardSpec, num_samples: int | None = None) -> int:
    """Total samples of a shard spec: ``num_samples`` if given, else the index, else tar headers."""
    return resolve_shards(spec, num_samples=num_samples).num_samples


@dataclass
class ShardVerdict:
    """One shard as ``check_shards`` found it; ``problems`` empty when it is good."""

    url: str
    samples: int = 0
    expected: int | None = None  # the index's count
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        return f"bad shard {self.url}: " + "; ".join(self.problems)


@dataclass
class ShardReport:
    """``check_shards`` result: one verdict per shard; ``ok`` when all are good."""

    shards: list[ShardVerdict]
    decoded: bool = False

    @property
    def bad(self) -> list[ShardVerdict]:
        return [v for v in self.shards if not v.ok]

    @property
    def num_samples(self) -> int:
        return sum(v.samples for v in self.shards)

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        return f"{len(self.shards)} shards, {self.num_samples} samples, {len(self.bad)} bad"

    def lines(self) -> list[str]:
        """One line per bad shard, then the summary."""
        return [v.line() for v in self.bad] + [self.summary()]


def _listed(what: str, items: Sequence[str], shown: int = 3) -> str:
    """``2 samples without ... (e.g. a, b)``: the count, then the first few."""
    more = ", ..." if len(items) > shown else ""
    return f"{len(items)} {what.replace('(s)', '' if len(items) == 1 else 's')} (e.g. {', '.join(items[:shown])}{more})"


def _verdict(job: tuple[str, int | None, bool]) -> ShardVerdict:
    """Read one shard fully (a process-pool job of ``check_shards``)."""
    url, expected, decode = job
    verdict = ShardVerdict(url, expected=expected)
    if not os.path.isfile(_local_path(url)):
        verdict.problems.append("does not exist")
        return verdict
    scan = scan_tar(url, read=True, decode=decode)
    verdict.samples = scan.samples
    if scan.problem:
        verdict.problems.append(scan.problem)
    if expected is not None and scan.samples != expected:
        verdict.problems.append(f"{scan.samples} samples, its index says {expected}")
    if scan.no_image:
        verdict.problems.append(_listed("sample(s) without an image field", scan.no_image))
    if scan.undecodable:
        verdict.problems.append(_listed("undecodable image(s)", scan.undecodable))
    return verdict


def check_shards(spec: ShardSpec, decode: bool = False, num_workers: int = 0) -> ShardReport:
    """Read every shard of ``spec`` fully before a long run (``gkd data verify``) and report, per
    shard: missing, unreadable or cut short, a sample count other than its index's, samples without
    an image field and, with ``decode``, undecodable images. Never raises for a bad shard (a spec
    naming nothing, a folder without shards or remote shards still raise). ``num_workers``
    processes share the shards (0: this process)."""
    shard_set = _resolve(spec)
    remote = [u for u in shard_set.urls if not _is_local(u)]
    if remote:
        raise ValueError(f"only local shards can be verified, got {remote[0]}")
    # a pattern or list: the counts of an index beside the shards, for those it lists
    counts = shard_set.counts or _neighbour_indexes(shard_set.urls)[0]
    jobs = [(u, c, decode) for u, c in zip(shard_set.urls, counts)]
    verdicts: list[ShardVerdict] = []
    with contextlib.ExitStack() as stack:
        if num_workers > 0 and len(jobs) > 1:
            results = stack.enter_context(ProcessPoolExecutor(max_workers=num_workers)).map(_verdict, jobs)
        else:
            results = map(_verdict, jobs)
        for verdict in results:
            verdicts.append(verdict)
            if len(verdicts) % 100 == 0:  # a long check says it is alive
                logger.info("verified %d of %d shards", len(verdicts), len(jobs))
    return ShardReport(verdicts, decoded=decode)


def verify_shards(spec: ShardSpec) -> ShardSet:
    """Read every shard fully (pre-flight check); raises ``ShardReadError`` naming the first bad
    shard (a missing one: ``FileNotFoundError``), e.g. one cut short or whose count disagrees with
    the index."""
    shard_set = resolve_shards(spec)
    report = check_shards(spec)
    if report.bad:
        more = f" (and {len(report.bad) - 1} more bad shards)" if len(report.bad) > 1 else ""
        raise ShardReadError(report.bad[0].line() + more)
    return shard_set


# ============================================================================ split plan

def _mix(*parts: Any) -> int:
    """Stable 64-bit seed from any printable parts (python's hash() is salted per process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard indices in this epoch's order; the same on every rank."""
    order = list(range(num_shards))
    random.Random(_mix("shards", seed, epoch)).shuffle(order)
    return order


@dataclass(frozen=True)
class ReadPlan:
    """One reader (rank, worker): walk ``shards`` in order, keep positions ``p % modulo == remainder``.

    ``copies[i]`` is the repeated-augmentation copy that reading ``shards[i]`` yields (empty: all 0).
    A run of equal consecutive shards is read once, each sample emitted once per copy of the run
    (positions ``p`` count the emitted copies)."""

    shards: tuple[int, ...]
    modulo: int = 1
    remainder: int = 0
    copies: tuple[int, ...] = ()


def read_plan(order: Sequence[int], rank: int, world_size: int, worker: int, num_workers: int,
              repeats: int = 1) -> ReadPlan:
    """Deal the (shard, copy) pairs of ``order`` (each shard ``repeats`` times in a row) to ranks
    then workers; fall back to sample-level splits when shards (for ranks) or a rank's pairs (for
    its workers) are fewer than the readers."""
    views = [(s, c) for s in order for c in range(repeats)]
    # ranks split by shard only when each gets a real shard: dealing r copies of too few shards
    # would give some ranks twice the samples of others
    if len(order) >= world_size:
        mine, modulo, remainder = views[rank::world_size], 1, 0
    else:
        mine, modulo, remainder = views, world_size, rank
    if modulo == 1 and len(mine) >= num_workers:
        mine = mine[worker::num_workers]
    else:  # sample level: keep p with p % modulo == remainder, then every num_workers-th of those
        modulo, remainder = modulo * num_workers, remainder + modulo * worker
    copies = tuple(c for _, c in mine) if repeats > 1 else ()
    return ReadPlan(tuple(s for s, _ in mine), modulo, remainder, copies)


# ============================================================================ streaming helpers

def _read_shard(url: str, expected: int | None) -> Iterator[dict]:
    """Raw samples of one tar (bytes, undecoded); errors name the shard. Without an ``expected``
    count a local tar's headers are checked afterwards (a tar cut short reads as a shorter one)."""
    n = 0
    try:
        for sample in wds.tarfile_samples([{"url": url}], handler=wds.reraise_exception):
            n += 1
            yield sample
    except (ShardReadError, GeneratorExit):
        raise
    except FileNotFoundError as exc:
        raise ShardReadError(f"shard {url} does not exist (moved or deleted after the run started?)") from exc
    except Exception as exc:  # tarfile / gopen / webdataset errors: say which shard
        raise ShardReadError(f"cannot read shard {url} after {n} samples (truncated or corrupt tar?): "
                             f"{_reason(exc)}; {_VERIFY_HINT}") from exc
    if expected is None and _is_local(url):
        expected = count_tar_samples(url)  # raises naming the shard when it is cut short
    if expected is not None and n != expected:
        raise ShardReadError(f"shard {url} holds {n} samples but its index says {expected} "
                             f"(truncated or replaced shard? {_VERIFY_HINT})")


def _one_pass(plan: ReadPlan, urls: Sequence[str], counts: Sequence[int] | None) -> Iterator[dict]:
    """This reader's raw samples from one walk over its shards, each tagged ``__copy__``."""
    pos = 0
    copies = plan.copies or (0,) * len(plan.shards)
    for i, run in itertools.groupby(zip(plan.shards, copies), key=lambda sc: sc[0]):
        run_copies = [c for _, c in run]
        for sample in _read_shard(urls[i], None if counts is None else counts[i]):
            for c in run_copies:
                if pos % plan.modulo == plan.remainder:
                    # copies share the bytes but not the dict: __copy__ / __pass__ differ per view
                    view = dict(sample) if len(run_copies) > 1 else sample
                    view["__copy__"] = c
                    yield view
                pos += 1


def _shuffle(stream: Iterator[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Seeded shuffle buffer over a finite stream (flushed, shuffled, at its end)."""
    buf: list[dict] = []
    for sample in stream:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        j = rng.randrange(bufsize)
        yield buf[j]
        buf[j] = sample
    rng.shuffle(buf)
    yield from buf


def _reader_stream(plan: ReadPlan, urls: Sequence[str], counts: Sequence[int] | None,
                   bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Endless shuffled stream of this reader's raw samples, cycling over its shards.

    Each pass is shuffled on its own, so a pass is used up before any sample repeats; samples
    get ``__pass__`` (the pass number) for their augmentation seed.
    """
    n_pass = 0
    while True:
        kept = 0
        for sample in _shuffle(_one_pass(plan, urls, counts), max(1, bufsize), rng):
            sample["__pass__"] = n_pass
            kept += 1
            yield sample
        if kept == 0:
            names = sorted({os.path.basename(urls[i]) for i in plan.shards})
            raise ShardReadError(f"a reader got no samples from its {len(names)} shard(s) ({', '.join(names[:3])}"
                                 f"{', ...' if len(names) > 3 else ''}): fewer samples than ranks x DataLoader "
                                 "workers? use fewer workers")
        n_pass += 1


class _Lookahead:
    """Iterator with ``peek(n)``, used to find a donor image past a fully undecodable batch."""

    def __init__(self, it: Iterator[dict]) -> None:
        self._it, self._buf = it, deque()

    def next(self) -> dict:
        return self._buf.popleft() if self._buf else next(self._it)

    def peek(self, n: int) -> dict:
        while len(self._buf) <= n:
            self._buf.append(next(self._it))
        return self._buf[n]

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore python/numpy/torch-CPU RNG states (matters when num_workers=0: the training
    process's generators must not be reseeded by the data pipeline)."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def aug_seed(seed: int, epoch: int, n_pass: int, key: str, copy: int = 0) -> int:
    """Augmentation seed of one view; copy 0 (and so ``repeats=1``) keeps the plain reader's seed."""
    return _mix("aug", seed, epoch, n_pass, key, *([copy] if copy else []))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # CPU only: never touches CUDA generators


def decode_image(sample: dict) -> Image.Image:
    """The RGB image of a raw webdataset sample (first of ``IMAGE_FIELDS``), fully decoded; raises one
    of ``_DECODE_ERRORS`` when it has none or it cannot be read."""
    data = next((sample[k] for k in IMAGE_FIELDS if k in sample), None)
    if data is None:
        raise ValueError(f"no image field (looked for {', '.join(IMAGE_FIELDS)})")
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")  # convert() forces a full decode


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """Fallback transform: PIL RGB -> float [3,H,W] in [0,1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div_(255)


# ============================================================================ dataset

@dataclass(frozen=True)
class _ReaderFailure:
    """What a DataLoader worker yields instead of a batch when its shards fail (see ``ShardLoader``)."""

    message: str


class ShardStream(IterableDataset):
    """Yields this rank's batches of one epoch (see module docstring); ``len`` = batches left."""

    def __init__(self, shard_set: ShardSet, transform: Callable | None, batch_size: int, *,
                 rank: int, world_size: int, epoch: int, seed: int, steps_per_epoch: int,
                 start_step: int = 0, shuffle_buffer: int = 1000, return_keys: bool = False,
                 repeats: int = 1) -> None:
        super().__init__()
        self.shard_set, self.transform = shard_set, transform or _to_tensor
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch, self.seed, self.repeats = epoch, seed, repeats
        self.steps_per_epoch, self.start_step = steps_per_epoch, start_step
        self.shuffle_buffer, self.return_keys = shuffle_buffer, return_keys
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    # --- plan ---------------------------------------------------------------------------------
    def _plan(self, worker: int, num_workers: int) -> ReadPlan:
        order = epoch_shard_order(len(self.shard_set.urls), self.seed, self.epoch)
        return read_plan(order, self.rank, self.world_size, worker, num_workers, self.repeats)

    # --- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict | _ReaderFailure]:
        if get_worker_info() is None:
            yield from self._batches()
            return
        try:
            yield from self._batches()
        except GKDError as exc:
            # torch would re-raise it in the main process as a new exception whose message is the
            # worker's whole traceback; ShardLoader raises this message alone
            yield _ReaderFailure(str(exc))

    def _batches(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        # Rotate roles on resume so that DataLoader worker 0 produces batch start_step.
        role = (worker_id + self.start_step) % num_workers
        n_skip = len(range(role, self.start_step, num_workers))
        n_emit = len(range(role, self.steps_per_epoch, num_workers)) - n_skip
        if n_emit <= 0:
            return
        plan = self._plan(role, num_workers)
        rng = random.Random(_mix("buffer", self.seed, self.epoch, self.rank, role, num_workers))
        stream = _Lookahead(_reader_stream(plan, self.shard_set.urls, self.shard_set.counts,
                                           self.shuffle_buffer, rng))
        try:
            for _ in range(n_skip * self.batch_size):  # resume: drop raw bytes, decode nothing
                stream.next()
            for _ in range(n_emit):
                yield self._make_batch([stream.next() for _ in range(self.batch_size)], stream)
        finally:
            stream.close()

    def _decode(self, sample: dict) -> tuple[Any, int] | None:
        """(payload, label), or None (logged once per key) when the sample is unusable; the payload
        (here the RGB image) is what ``_prepare`` turns into the sample's tensors."""
        key = sample.get("__key__")
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
            return decode_image(sample), label
        except _DECODE_ERRORS as exc:
            if key not in self._logged:
                self._logged.add(key)
                logger.warning("skipping undecodable sample %s in %s: %s: %s", key,
                               sample.get("__url__"), type(exc).__name__, exc)
            return None

    def _donor(self, decoded: list, j: int, stream: _Lookahead) -> tuple[Image.Image, int]:
        """Nearest decodable sample after slot j in this batch, else after the batch."""
        b = len(decoded)
        for k in range(1, b):
            if decoded[(j + k) % b] is not None:
                return decoded[(j + k) % b]
        for n in range(_MAX_LOOKAHEAD):  # peeked samples stay in the stream for later batches
            got = self._decode(stream.peek(n))
            if got is not None:
                return got
        raise ShardReadError(f"no decodable image among {b + _MAX_LOOKAHEAD} consecutive samples (rank "
                             f"{self.rank}, last in {stream.peek(_MAX_LOOKAHEAD - 1).get('__url__')}): the shards "
                             f"look broken; `gkd data verify SHARDS --decode` lists the bad ones")

    def _prepare(self, img: Image.Image, sample: dict) -> dict[str, torch.Tensor]:
        """The slot's tensors: its image, augmented with the slot's own seed (so a donor image gets a
        fresh augmentation)."""
        _seed_all(aug_seed(self.seed, self.epoch, sample["__pass__"], sample["__key__"], sample.get("__copy__", 0)))
        return {"image": self.transform(img)}

    def _make_batch(self, raw: list[dict], stream: _Lookahead) -> dict:
        decoded = [self._decode(s) for s in raw]
        skipped = [int(d is None) for d in decoded]
        items, labels = [], []
        with _preserved_rng():
            for j, sample in enumerate(raw):
                payload, label = decoded[j] if decoded[j] is not None else self._donor(decoded, j, stream)
                items.append(self._prepare(payload, sample))
                labels.append(label)
        batch = {name: torch.stack([it[name] for it in items]) for name in items[0]}
        batch.update(label=torch.tensor(labels, dtype=torch.int64), skipped=torch.tensor(skipped, dtype=torch.int64))
        if self.return_keys:
            batch["key"] = [s["__key__"] for s in raw]
        return batch


# ============================================================================ public builder

class _RaisingIter:
    """A DataLoader iterator that raises a worker's ``_ReaderFailure`` as a ``ShardReadError``."""

    def __init__(self, it: Iterator) -> None:
        self._it: Iterator | None = it

    def __iter__(self) -> "_RaisingIter":
        return self

    def __len__(self) -> int:
        return len(self._it) if self._it is not None else 0

    def __next__(self) -> dict:
        if self._it is None:
            raise StopIteration
        item = next(self._it)
        if isinstance(item, _ReaderFailure):
            it, self._it = self._it, None
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:  # now, not whenever the traceback lets go of the iterator
                shutdown()
            raise ShardReadError(item.message)
        return item


class ShardLoader(DataLoader):
    """The DataLoader ``build_shard_loader`` returns: a shard error in a worker process surfaces as
    the worker's own one-line ``ShardReadError``."""

    def __iter__(self) -> _RaisingIter:
        return _RaisingIter(super().__iter__())


def epoch_samples(num_samples: int, repeats: int = 1) -> int:
    """Samples (views) one epoch draws over all ranks, counted as the authors' samplers count.

    ``repeats=1``: all ``num_samples``. ``repeats>1`` (RASampler): its per-rank
    ``num_selected_samples = floor(N // 256 * 256 / world)`` summed over ranks, i.e. N rounded down
    to a multiple of 256 — not r·N: the r-fold list is cut, so an epoch sees about N/r images r times
    each. (With drop_last its steps, ``floor(floor(N // 256 * 256 / world) / B)``, equal
    ``epoch_samples // (B * world)``.) Deviation: fewer than 256 samples keep all N, where
    RASampler's epoch would be empty.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if repeats == 1 or num_samples < RA_ROUND:
        return num_samples
    return num_samples // RA_ROUND * RA_ROUND


def default_steps_per_epoch(num_samples: int, batch_size_per_rank: int, world_size: int, repeats: int = 1) -> int:
    """Full global batches per epoch: ``epoch_samples(num_samples, repeats) // (batch_size_per_rank * world_size)``."""
    return epoch_samples(num_samples, repeats) // (batch_size_per_rank * world_size)


def build_shard_loader(
    shards: ShardSpec,
    transform: Callable | None,
    batch_size_per_rank: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    num_workers: int = 0,
    steps_per_epoch: int | None = None,
    start_step: int = 0,
    shuffle_buffer: int = 1000,
    num_samples: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    return_keys: bool = False,
    stream_cls: type[ShardStream] = ShardStream,
    repeats: int = 1,
) -> DataLoader:
    """DataLoader over webdataset shards for one epoch of one rank; rebuild it every epoch.

    Args:
        shards: brace pattern, list, folder or index JSON (see ``resolve_shards``).
        transform: PIL RGB image -> float tensor [3,H,W] (all the same size); None: to [0,1] tensor.
        batch_size_per_rank: B of every batch.
        rank, world_size: this process's place in the DDP group; do not pass the loader to
            ``accelerator.prepare`` (it already splits the data).
        epoch, seed: select the shard order, shuffle buffers and augmentation seeds.
        num_workers: DataLoader worker processes (0 = in this process). Part of the split plan:
            resuming exactly needs the same value.
        steps_per_epoch: batches every rank yields; default ``epoch_samples(num_samples, repeats) //
            (B * world_size)``.
        start_step: first batch of this epoch to yield (resume); earlier ones are skipped undecoded.
        shuffle_buffer: raw samples in each reader's shuffle buffer (1 = no shuffling).
        num_samples: declared total (overrides the index; needed for remote shards without one).
        pin_memory: passed to the DataLoader.
        return_keys: also yield ``key``: list of sample keys.
        stream_cls: the dataset class (a teacher cache decodes its own samples, see teacher_cache).
        repeats: augmented views of every sample (repeated augmentation, module docstring); 1: plain.

    Returns:
        ``DataLoader`` of dict batches (module docstring); ``len()`` = ``steps_per_epoch -
        start_step``; ``loader.dataset.steps_per_epoch`` and ``loader.dataset.shard_set`` describe it.
    """
    if batch_size_per_rank < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch/rank settings: B={batch_size_per_rank}, rank={rank}, world={world_size}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (views of each sample), got {repeats}")
    shard_set = resolve_shards(shards, num_samples=num_samples)
    if steps_per_epoch is None:
        steps_per_epoch = default_steps_per_epoch(shard_set.num_samples, batch_size_per_rank, world_size, repeats)
        if steps_per_epoch < 1:
            raise ValueError(f"{shard_set.num_samples} samples cannot fill one global batch of "
                             f"{batch_size_per_rank} x {world_size}")
    if not 0 <= start_step <= steps_per_epoch:
        raise ValueError(f"start_step {start_step} outside [0, {steps_per_epoch}]")
    dataset = stream_cls(shard_set, transform, batch_size_per_rank, rank=rank, world_size=world_size,
                          epoch=epoch, seed=seed, steps_per_epoch=steps_per_epoch, start_step=start_step,
                          shuffle_buffer=shuffle_buffer, return_keys=return_keys, repeats=repeats)
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
    return ShardLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                       pin_memory=pin_memory, persistent_workers=False, **extra)
