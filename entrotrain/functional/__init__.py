"""Pure tensor maths: entropy of logits, probabilities and attention. No hooks, no Lightning, no logging.

Contract of every function here (DESIGN.md §8): bad input raises :class:`~entrotrain.errors.EntrotrainError` naming
the argument, what was received and the fix (dims out of range never wrap around; non-finite or out-of-range
parameters such as a temperature, scale, window, quantile or fraction are refused); otherwise the result is finite
wherever the input row is finite. NaN/Inf *data* gives NaN only in the rows (tokens, queries) that read it.
Empty inputs give empty results, rows with no valid entry give entropy 0, and losses on empty or all-masked input
give 0 with zero gradient.

Masks: ``mask`` of the logits functions is boolean (True = the entry takes part); token masks of the policy
functions are bool, integer 0/1 or float 0/1 (True/1 = a valid token); ``attn_mask`` is boolean (True = attend) or
a float additive bias; ``key_padding_mask`` is boolean with True = padding (``nn.MultiheadAttention``). Integer
``attn_mask`` / ``key_padding_mask`` are refused with the fix: an HF ``attention_mask`` (1 = keep) becomes
``key_padding_mask=attention_mask == 0``.
"""

from entrotrain.functional.attention import (
    AttentionEntropy,
    AttentionPath,
    attention_entropy,
    attention_entropy_from_probs,
    attention_entropy_from_scores,
    attention_entropy_stats,
    normalized_entropy,
)
from entrotrain.functional.attention_masks import AttentionMask
from entrotrain.functional.entropy_reward_fit import (
    CeilingVerdict,
    EntropyRewardFit,
    ceiling_verdict,
    fit_entropy_reward,
    fit_extrapolation,
)
from entrotrain.functional.entropy import entropy_from_logits, entropy_from_probs, row_entropy
from entrotrain.functional.policy import (
    AGG_MODES,
    CovarianceSums,
    TokenStats,
    aggregate_loss,
    covariance_sums,
    high_entropy_mask,
    policy_covariance,
    steer_weights,
    token_entropy,
    token_logprobs,
)
from entrotrain.functional.policy_head import linear_entropy_and_logprobs

__all__ = [
    "CeilingVerdict",
    "EntropyRewardFit",
    "ceiling_verdict",
    "fit_entropy_reward",
    "fit_extrapolation",
    "AGG_MODES",
    "CovarianceSums",
    "TokenStats",
    "aggregate_loss",
    "covariance_sums",
    "high_entropy_mask",
    "linear_entropy_and_logprobs",
    "policy_covariance",
    "steer_weights",
    "token_entropy",
    "token_logprobs",
    "AttentionEntropy",
    "AttentionMask",
    "AttentionPath",
    "attention_entropy",
    "attention_entropy_from_probs",
    "attention_entropy_from_scores",
    "attention_entropy_stats",
    "entropy_from_logits",
    "entropy_from_probs",
    "normalized_entropy",
    "row_entropy",
]

# --- representation spectra (spectrum.py, representation.py) ---
from entrotrain.functional.representation import (  # noqa: E402
    REPRESENTATION_MEASURES,
    RepresentationMeasure,
    diffusion_matrix,
    diffusion_spectral_entropy,
    diffusion_spectral_mutual_information,
    effective_rank,
    finite_row_mask,
    finite_rows,
    get_measure,
    matrix_entropy,
    matrix_erank,
    matrix_nuclear_norm,
    median_pairwise_distance,
    rankme,
    vendi_score,
    vendi_score_from_kernel,
)
from entrotrain.functional.spectrum import (  # noqa: E402
    kernel_spectrum,
    linear_kernel_spectrum,
    renyi2,
    renyi2_from_rows,
    spectral_entropy,
)

__all__ += [
    "REPRESENTATION_MEASURES",
    "RepresentationMeasure",
    "diffusion_matrix",
    "diffusion_spectral_entropy",
    "diffusion_spectral_mutual_information",
    "effective_rank",
    "finite_row_mask",
    "finite_rows",
    "get_measure",
    "kernel_spectrum",
    "linear_kernel_spectrum",
    "matrix_entropy",
    "matrix_erank",
    "matrix_nuclear_norm",
    "median_pairwise_distance",
    "rankme",
    "renyi2",
    "renyi2_from_rows",
    "spectral_entropy",
    "vendi_score",
    "vendi_score_from_kernel",
]
from entrotrain.functional.covariance import CovarianceAccumulator  # noqa: E402
from entrotrain.functional.stochastic_spectrum import (  # noqa: E402
    SpectralEstimate,
    lanczos_quadrature,
    slq_diffusion_spectral_entropy,
    slq_spectral_entropy,
    slq_vendi_score,
)

__all__ += [
    "CovarianceAccumulator",
    "SpectralEstimate",
    "lanczos_quadrature",
    "slq_diffusion_spectral_entropy",
    "slq_spectral_entropy",
    "slq_vendi_score",
]

# --- MoE routing (routing.py) and information-plane estimators (information.py) ---
from entrotrain.functional.routing import (  # noqa: E402
    RouterSums,
    RouterValues,
    router_statistics,
    router_values,
    tsallis_entropy,
    tsallis_entropy_from_logits,
    tsallis_max,
)
from entrotrain.functional.information import (  # noqa: E402
    ESTIMATORS as INFORMATION_ESTIMATORS,
    binned_entropy,
    binned_mutual_information,
    binned_symbols,
    discrete_entropy,
    discrete_mutual_information,
    estimator_parameters,
    information_plane_point,
    kde_mutual_information,
    ksg_mutual_information,
    loggable_parameters,
    pca_compress,
    ross_mutual_information,
)

__all__ += [
    "RouterSums",
    "RouterValues",
    "router_statistics",
    "router_values",
    "tsallis_entropy",
    "tsallis_entropy_from_logits",
    "tsallis_max",
    "INFORMATION_ESTIMATORS",
    "binned_entropy",
    "binned_mutual_information",
    "binned_symbols",
    "discrete_entropy",
    "discrete_mutual_information",
    "estimator_parameters",
    "information_plane_point",
    "kde_mutual_information",
    "ksg_mutual_information",
    "loggable_parameters",
    "pca_compress",
    "ross_mutual_information",
]
from entrotrain.functional.spectral_objectives import (  # noqa: E402
    EIG_EPS,
    MMCR_NORM_EPS,
    matrix_entropy_objective,
    mmcr_objective,
    mmcr_views,
    nuclear_norm,
    spectral_entropy_objective,
    vendi_entropy_objective,
    vendi_score_objective,
)

__all__ += [
    "EIG_EPS",
    "MMCR_NORM_EPS",
    "matrix_entropy_objective",
    "mmcr_objective",
    "mmcr_views",
    "nuclear_norm",
    "spectral_entropy_objective",
    "vendi_entropy_objective",
    "vendi_score_objective",
]
from entrotrain.functional.router_losses import (  # noqa: E402
    DynMoLETerms,
    RouterLogits,
    dynmole_router_loss,
    dynmole_router_terms,
    dynmole_routing,
    load_balancing_loss,
    router_z_loss,
    sequence_balance_loss,
)

__all__ += [
    "DynMoLETerms",
    "RouterLogits",
    "dynmole_router_loss",
    "dynmole_router_terms",
    "dynmole_routing",
    "load_balancing_loss",
    "router_z_loss",
    "sequence_balance_loss",
]
from entrotrain.functional.generation_diversity import (  # noqa: E402
    NgramCounts,
    distinct_n,
    ngram_counts,
    repetition_rate,
    type_token_ratio,
)
from entrotrain.functional.prediction_entropy import (  # noqa: E402
    PredictionStats,
    prediction_stats_from_hidden,
    prediction_stats_from_logits,
)

__all__ += [
    "NgramCounts",
    "distinct_n",
    "ngram_counts",
    "repetition_rate",
    "type_token_ratio",
    "PredictionStats",
    "prediction_stats_from_hidden",
    "prediction_stats_from_logits",
]
from entrotrain.functional.token_shaping import (  # noqa: E402
    PhaseEntropy,
    WindowEntropy,
    canon_advantage,
    canon_split,
    high_window_entropy_mask,
    pear_reward,
    phase_entropy,
    phase_ids_from_delimiter,
    sequence_entropy,
    window_entropy,
)

__all__ += [
    "PhaseEntropy",
    "WindowEntropy",
    "canon_advantage",
    "canon_split",
    "high_window_entropy_mask",
    "pear_reward",
    "phase_entropy",
    "phase_ids_from_delimiter",
    "sequence_entropy",
    "window_entropy",
]
from entrotrain.functional.attention_fused_grad import fused_attention_entropy, fused_grad_available  # noqa: E402

__all__ += ["fused_attention_entropy", "fused_grad_available"]
from entrotrain.functional.spectral_precision import (  # noqa: E402
    AUTO_RTOL,
    PRECISIONS,
    float32_entropy_error_bound,
)

__all__ += ["AUTO_RTOL", "PRECISIONS", "float32_entropy_error_bound"]

from entrotrain.functional.attention_joint import attention_with_entropy, joint_attention_applies  # noqa: E402

__all__ += ["attention_with_entropy", "joint_attention_applies"]
