"""Optional Triton fast paths of :mod:`entrotrain.functional`, behind one dispatch.

Nothing here is imported by ``import entrotrain``; the kernel modules import ``triton`` only when first used. Each
kernel module offers a function with the signature and semantics of the torch function it accelerates (the torch
function is the product and the oracle; DESIGN §1, §7):

- :func:`entrotrain.kernels.logits_entropy.entropy_from_logits`
- :func:`entrotrain.kernels.linear_entropy.linear_entropy_and_logprobs`
- :func:`entrotrain.kernels.attention_entropy.attention_entropy` / ``attention_entropy_stats``

Choose with :func:`resolve_impl` (``impl="auto" | "torch" | "triton"``, environment override ``ENTROTRAIN_IMPL``).
"""

from __future__ import annotations

from entrotrain.kernels.dispatch import (
    IMPL_ENV,
    KernelUnavailableError,
    can_run_triton,
    resolve_impl,
    triton_available,
    triton_interpret,
)

__all__ = [
    "IMPL_ENV",
    "KernelUnavailableError",
    "can_run_triton",
    "resolve_impl",
    "triton_available",
    "triton_interpret",
]
