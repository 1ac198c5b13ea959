"""Training text every machine has: the Python standard library's own source, as bytes.

The corpus is every ``.py`` file under the running interpreter's stdlib directory
(``sysconfig.get_paths()["stdlib"]``), tests, third-party packages and the
generated codec tables (``encodings/``) left out, concatenated in sorted
relative-path order, each file behind a one-line ``# file: <path>`` header. The
documentation comes with it: docstrings everywhere, and ``pydoc_data/topics.py``
holds the language reference's topic pages. Tokens are bytes (vocabulary 256), so
no tokenizer or download is needed.

The held-out split is fixed by file, not by seed: a file is held out when the
first byte of ``sha256(relative path)`` is divisible by 20 (about 5% of files).
The same path lands in the same split on every machine; the files themselves
differ between Python versions (3.11 here, 3.12 on the GPU machine), so every
result records the corpus sizes and its SHA-256.

Batches are random windows whose start offsets come from a CPU
``torch.Generator`` seeded per run, so the data order is a function of the seed
alone, identical on every device and for every arm of the comparison. Evaluation
uses fixed, evenly spaced windows that do not depend on the seed.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
EXCLUDED_TOP_LEVEL = frozenset({"encodings"})  # machine-generated codec tables, not text
HELDOUT_MODULUS = 20  # one file in 20 is held out
VOCAB_SIZE = 256


@dataclass(frozen=True)
class Corpus:
    """Train and held-out byte streams (uint8 tensors on the CPU) and where they came from."""

    train: torch.Tensor
    heldout: torch.Tensor
    train_files: int
    heldout_files: int
    sha256: str
    source: str
    python_version: str

    def describe(self) -> dict:
        return {
            "source": self.source,
            "python_version": self.python_version,
            "train_bytes": int(self.train.numel()),
            "heldout_bytes": int(self.heldout.numel()),
            "train_files": self.train_files,
            "heldout_files": self.heldout_files,
            "sha256": self.sha256,
        }


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every corpus file under ``root``, sorted by relative path."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts) or rel.parts[0] in EXCLUDED_TOP_LEVEL:
            continue
        if path.is_file():
            files.append((rel.as_posix(), path))
    return sorted(files)


def is_heldout(relative_path: str) -> bool:
    return hashlib.sha256(relative_path.encode()).digest()[0] % HELDOUT_MODULUS == 0


def build_corpus(root: Path | None = None) -> Corpus:
    """Read the corpus; raises ``FileNotFoundError`` when ``root`` holds no Python files."""
    root = Path(root) if root is not None else stdlib_dir()
    files = corpus_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files under {root}; pass the directory of a Python standard library")
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for rel, path in files:
        parts[is_heldout(rel)].append(b"# file: " + rel.encode() + b"\n" + path.read_bytes() + b"\n\n")
    train, heldout = b"".join(parts[False]), b"".join(parts[True])
    digest = hashlib.sha256(train + b"\0heldout\0" + heldout).hexdigest()
    return Corpus(
        train=torch.frombuffer(bytearray(train), dtype=torch.uint8),
        heldout=torch.frombuffer(bytearray(heldout), dtype=torch.uint8),
        train_files=len(parts[False]),
        heldout_files=len(parts[True]),
        sha256=digest,
        source=str(root),
        python_version=platform.python_version(),
    )


class WindowSampler:
    """Random ``(inputs, targets)`` windows of ``seq_len`` bytes; order fixed by ``seed``.

    ``tokens`` may live on any device. Start offsets are drawn on the CPU, so that
    every device sees the same windows, a chunk of ``CHUNK_STEPS`` batches at a
    time, so that a GPU run copies offsets to the device (and waits for it) once
    per chunk rather than every step.
    """

    CHUNK_STEPS = 256

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if tokens.numel() <= seq_len + 1:
            raise ValueError(f"corpus of {tokens.numel()} tokens is too short for windows of {seq_len}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.window = torch.arange(seq_len + 1, device=tokens.device)
        self.chunk: torch.Tensor | None = None
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chunk is None or self.position == self.chunk.shape[0]:
            starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1,
                                   (self.CHUNK_STEPS, self.batch_size), generator=self.generator)
            self.chunk, self.position = starts.to(self.tokens.device), 0
        starts = self.chunk[self.position]
        self.position += 1
        windows = self.tokens[starts[:, None] + self.window].long()
        return windows[:, :-1], windows[:, 1:]


def gather_windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = (starts[:, None] + torch.arange(seq_len + 1)).to(tokens.device)
    windows = tokens[index].long()
    return windows[:, :-1], windows[:, 1:]


def fixed_batches(tokens: torch.Tensor, n_batches: int, batch_size: int,
                  seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches of evenly spaced windows covering ``tokens`` (independent of any seed)."""
    n_windows = n_batches * batch_size
    last_start = tokens.numel() - seq_len - 1
    if last_start < 0:
        raise ValueError(f"corpus of {tokens.numel()} tokens is too short for windows of {seq_len}")
    starts = torch.linspace(0, last_start, n_windows, dtype=torch.float64).long()
    return [gather_windows(tokens, chunk, seq_len) for chunk in starts.split(batch_size)]
