"""The plain settings of continual training, importable without torch (``--help``, settings).

``TrainConfig`` is what ``ctp.continual.ContinualLearner`` trains a chunk with (it is re-exported
there); ``GENERATORS`` names the pseudo-text generators of ``ctp.pseudo_texts``.
"""

from __future__ import annotations

from dataclasses import dataclass

GENERATORS = ("edit", "captioner", "random")


@dataclass
class TrainConfig:
    epochs: int = 20  # epochs over each chunk (tiny models from scratch need many)
    batch_size: int = 64  # pairs per step (new + replayed)
    lr: float = 2e-3  # peak learning rate (cosine schedule per chunk)
    weight_decay: float = 0.1
    warmup_steps: int = 10
    replay_pool: int = 4096  # memory items snapshotted (and decoded) per chunk for replay
    pseudo_keep: int = 2  # pseudo texts cached per memory image
    pseudo_candidates: int = 16  # candidates proposed per image before the guard
    pseudo_margin: float = 0.05  # guard: keep s(img, cand) < s(img, true) - margin
    refresh_every: int = 1  # regenerate cached pseudo texts after this many chunks
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    # A chunk of fewer pairs than this trains for proportionally fewer epochs (at least 1), so a
    # small partial chunk gets the steps per pair of a full one, not ``epochs`` passes over a
    # handful of pairs; 0: every chunk trains for ``epochs`` (the offline experiments).
    full_chunk_pairs: int = 0

    def epochs_for(self, pairs: int) -> int:
        """The epochs a chunk of ``pairs`` pairs trains for: ``epochs``, scaled down below
        ``full_chunk_pairs`` (``epochs * pairs / full_chunk_pairs``, rounded, at least 1)."""
        if self.full_chunk_pairs <= 0 or pairs >= self.full_chunk_pairs:
            return self.epochs
        return max(1, round(self.epochs * pairs / self.full_chunk_pairs))
