// The CUDA kernels of csrc/cuda/sample_norm.cu, compiled as host C++ against the emulation
// layer (LIPKERNELS_CUDA_EMULATION builds only; one translation unit per .cu file, as
// nvcc compiles them).
#include "../sample_norm.cu"
