"""Drop-in layers: spectral normalization, gradient-normalized discriminators, penalties."""
from .gradnorm import GradNorm, GraN, gradient_penalty, input_gradient, r1_penalty
from .spectral_norm import (SNConv1d, SNConv2d, SNConv3d, SNConvTranspose1d, SNConvTranspose2d,
                            SNConvTranspose3d, SNEmbedding, SNLinear, SpectralNormGroup,
                            spectral_norm)

__all__ = [
    "spectral_norm", "SpectralNormGroup", "SNLinear", "SNConv1d", "SNConv2d", "SNConv3d",
    "SNConvTranspose1d", "SNConvTranspose2d", "SNConvTranspose3d", "SNEmbedding",
    "GradNorm", "GraN", "gradient_penalty", "r1_penalty", "input_gradient",
]
