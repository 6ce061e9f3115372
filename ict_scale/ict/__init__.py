"""The iCT algorithm: pure functions of tensors and step counts. Imports only torch."""
from .objective import (CURRICULA, METRICS, Discretisation, ICTLoss, consistency_pair, discretisation, pseudo_huber,
                        pseudo_huber_c, sample_intervals, squared_l2)
from .precond import ConsistencyModel, boundary_scalings
from .sampling import (MAX_STEPS, from_uint8, generate_uint8, multistep_sample, sampling_noise, sampling_sigmas,
                       to_uint8)
from .schedule import (P_MEAN, P_STD, RHO, S0, S1, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, ct_teacher_decay,
                       doubling_period, ict_weights, karras_sigmas, lognormal_index_probs, num_scales_at,
                       num_scales_sqrt_at)

__all__ = [
    "CURRICULA", "METRICS", "Discretisation", "ICTLoss", "consistency_pair", "discretisation", "pseudo_huber",
    "pseudo_huber_c", "sample_intervals", "squared_l2", "ConsistencyModel", "boundary_scalings", "MAX_STEPS",
    "from_uint8", "generate_uint8", "multistep_sample", "sampling_noise", "sampling_sigmas", "to_uint8", "P_MEAN",
    "P_STD", "RHO", "S0", "S1", "SIGMA_DATA", "SIGMA_MAX", "SIGMA_MIN", "ct_teacher_decay", "doubling_period",
    "ict_weights", "karras_sigmas", "lognormal_index_probs", "num_scales_at", "num_scales_sqrt_at",
]
