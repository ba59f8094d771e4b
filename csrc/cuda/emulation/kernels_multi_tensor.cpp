// The CUDA kernels of csrc/cuda/multi_tensor.cu, compiled as host C++ against the emulation
// layer (LIPKERNELS_CUDA_EMULATION builds only; one translation unit per .cu file, as
// nvcc compiles them).
#include "../multi_tensor.cu"
