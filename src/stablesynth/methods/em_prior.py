"""em_prior: label-shift adaptation on the device, with no upload at all (Saerens et al., 2002).

A device's users ask their own mix of questions, so its answer prior differs from the one
the global head was trained under. EM re-estimates that prior from the head's posteriors
over the session's *earlier* clips (causal: clip t sees clips 0..t−1 only) and re-weights
clip t's posterior by it:

  adjusted(a | x) ∝ p(a | x) · π(a) / π_train(a)
  π(a) = (Σ_{s<t} adjusted_s(a) + λ · π_train(a)) / (t + λ)      (iterated to a fixed point)

λ (``prior_strength``, pseudo-clips of the training prior) keeps an early session from
trusting a handful of clips; it is chosen on validation clips (held-out history of the seen
devices), never on the real-time clips the report scores.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from stablesynth.data.batch import FeatureBatch
from stablesynth.methods.base import METHODS
from stablesynth.methods.baselines import FineTune
from stablesynth.methods.config import MethodConfig

#: EM iterations per clip: the fixed point moves little once the prior has a few clips behind it.
EM_ITERATIONS = 10
#: Prior strengths tried on the validation clips (pseudo-clips of the training prior).
PRIOR_STRENGTHS = (1.0, 3.0, 10.0, 30.0, 100.0)


@METHODS.register("em_prior")
class EMPrior(FineTune):
    """The stage-1 global head, re-weighted on the device by an EM estimate of the session's answer prior."""

    name: ClassVar[str] = "em_prior"
    label: ClassVar[str] = "EM prior (on device)"

    def __init__(self, cfg: MethodConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        # Buffers, so a checkpoint carries what prepare() measured and chose.
        self.register_buffer("train_prior", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("prior_strength", torch.tensor(10.0))

    session_causal: ClassVar[bool] = True
    needs_answer_classes: ClassVar[bool] = True
    #: The same head as Fine-tuning, but not the reference the studies use.
    is_global_head: ClassVar[bool] = False

    def prepare(self, train: FeatureBatch, validation: FeatureBatch | None) -> None:
        """π_train from the training labels; λ chosen on ``validation`` (per-device causal streams)."""
        valid = train.label >= 0
        counts = torch.bincount(train.label[valid], minlength=self.num_classes).double() + 1.0
        self.train_prior.copy_((counts / counts.sum()).float())
        if validation is None or len(validation) == 0:
            return
        best, best_acc = float(self.prior_strength), -1.0
        for lam in PRIOR_STRENGTHS:
            self.prior_strength.fill_(lam)
            correct = total = 0
            for d in validation.device.unique().tolist():
                rows = validation.index(torch.nonzero(validation.device == d).flatten())
                pred = self.predict_stream(rows.f_g).argmax(-1)
                keep = rows.label >= 0
                correct += int((pred[keep] == rows.label[keep]).sum())
                total += int(keep.sum())
            acc = correct / max(total, 1)
            if acc > best_acc:
                best, best_acc = lam, acc
        self.prior_strength.fill_(best)

    @torch.no_grad()
    def predict_stream(self, f_g: torch.Tensor) -> torch.Tensor:
        """Log-posteriors [n, K] of one session's clips in capture order, each using only the clips before it."""
        was_training = self.training
        self.eval()
        logp = self.predict(f_g, {"weight": self.weight, "bias": self.bias}).log_softmax(-1)
        self.train(was_training)
        post = logp.exp()
        pi_train = self.train_prior
        lam = float(self.prior_strength)
        out = torch.empty_like(logp)
        pi = pi_train.clone()
        for t in range(len(f_g)):
            out[t] = (logp[t] + (pi / pi_train).log()).log_softmax(-1)
            seen = post[: t + 1]
            pi = pi_train.clone()
            for _ in range(EM_ITERATIONS):
                adjusted = seen * (pi / pi_train)
                adjusted = adjusted / adjusted.sum(-1, keepdim=True)
                pi = (adjusted.sum(0) + lam * pi_train) / (len(seen) + lam)
        return out
