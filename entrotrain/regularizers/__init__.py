"""Cures: σReparam and attention-entropy regularisers, composable loss modules built on functional/ and taps/."""

from entrotrain.regularizers.attention_entropy import (
    AttentionEntropyMaximization,
    EntropyBandRegularizer,
    EntropyFloorRegularizer,
)
from entrotrain.regularizers.composition import (
    Regularizer,
    RegularizerOutput,
    RegularizerSum,
    combine_regularizers,
    scheduled_weight,
)
from entrotrain.regularizers.policy_loss import (
    ClipCovLoss,
    EntropyBonus,
    KLCovLoss,
    PolicyLoss,
    PolicyLossOutput,
    PolicyLossSum,
    PPOClipLoss,
    SteerLoss,
)
from entrotrain.regularizers.sigma_reparam import (
    SigmaReparamConv1D,
    SigmaReparamLinear,
    SigmaReparamQKJoint,
    reset_sigma_reparam_state,
    sigma_reparam,
    sigma_reparam_names,
)

__all__ = [
    "AttentionEntropyMaximization",
    "ClipCovLoss",
    "EntropyBonus",
    "KLCovLoss",
    "EntropyBandRegularizer",
    "EntropyFloorRegularizer",
    "PPOClipLoss",
    "PolicyLoss",
    "PolicyLossOutput",
    "PolicyLossSum",
    "SteerLoss",
    "Regularizer",
    "RegularizerOutput",
    "RegularizerSum",
    "SigmaReparamConv1D",
    "SigmaReparamLinear",
    "SigmaReparamQKJoint",
    "reset_sigma_reparam_state",
    "combine_regularizers",
    "scheduled_weight",
    "sigma_reparam",
    "sigma_reparam_names",
]
from entrotrain.regularizers.representation import MatrixEntropyRegularizer, MMCRLoss, VendiRegularizer  # noqa: E402

__all__ += ["MatrixEntropyRegularizer", "MMCRLoss", "VendiRegularizer"]
from entrotrain.regularizers.router_loss import (  # noqa: E402
    ChosenRouterInputs,
    LoadBalancingLoss,
    RouterInputs,
    RouterZLoss,
    SequenceBalanceLoss,
    TsallisRouterLoss,
)

__all__ += [
    "ChosenRouterInputs",
    "LoadBalancingLoss",
    "RouterInputs",
    "RouterZLoss",
    "SequenceBalanceLoss",
    "TsallisRouterLoss",
]
from entrotrain.regularizers.token_shaping import (  # noqa: E402
    AdvantageEstimator,
    AdvantageOutput,
    CANONAdvantage,
    PEARShaping,
    RewardShaper,
    RewardShaperSum,
    ShapedRewards,
)

__all__ += [
    "AdvantageEstimator",
    "AdvantageOutput",
    "CANONAdvantage",
    "PEARShaping",
    "RewardShaper",
    "RewardShaperSum",
    "ShapedRewards",
]
