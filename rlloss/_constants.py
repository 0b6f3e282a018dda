"""Numbers and names more than one module needs: the one place each is written.

A leaf: imports nothing of rlloss, so the kernels (``rlloss.kernels``) and the public modules can
both use it without importing each other.
"""

from __future__ import annotations

import math

# k3 exponentiates ref_logp - logp: the clamp keeps exp finite in fp32
KL_INPUT_CLAMP = 20.0
# the default clamp of logp - old_logp (every objective): exp(20) is finite in fp32 with room to spare
MAX_LOG_RATIO = 20.0
# the floor under a probability or weight before its log (DPPO's binary KL, VESPO's row weight)
LOG_FLOOR = 1e-8
LOG_OF_FLOOR = math.log(LOG_FLOOR)
# VESPO's row log-weight is clamped to [LOG_OF_FLOOR, ROW_LOG_WEIGHT_MAX]
ROW_LOG_WEIGHT_MAX = 20.0
# A log-probability is <= 0. Above this it is counted into policy_loss's metrics["positive_logp"]:
# fp32 rounding of x - logsumexp(x) leaves a true 0 at most a few ulps of the logsumexp above 0 (about 1e-5
# at 100), far below; a power of two, so every float dtype holds it exactly and each backend compares the same.
POSITIVE_LOGP_TOL = 2.0**-10
# VESPO's lambda floor (lam = 0 would make its weight flat at 1: a floor keeps the shape)
VESPO_MIN_LAM = 1e-4

KL_KINDS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant", "token_sum")
# group_advantages' scales, in the order of the advantage kernels' SCALE codes
SCALES = ("group", "batch", "none")
# the objectives of the fused per-token kernel, in the order of its compile-time codes
FUSED_OBJECTIVES = ("ppo", "cispo", "sapo", "reinforce", "dppo_tv", "dppo_kl", "dro", "vespo", "gmpo")

# kernel codes: a name's position in its tuple (KL kinds count from 1: 0 means "no KL term")
KL_KIND_CODES = {name: i + 1 for i, name in enumerate(KL_KINDS)}
AGGREGATION_CODES = {name: i for i, name in enumerate(AGGREGATIONS)}
OBJECTIVE_CODES = {name: i for i, name in enumerate(FUSED_OBJECTIVES)}
SCALE_CODES = {name: i for i, name in enumerate(SCALES)}

# what a sample alone in its group gets, in the group estimators and the optimal token baseline
SINGLETONS = ("zero", "keep")
