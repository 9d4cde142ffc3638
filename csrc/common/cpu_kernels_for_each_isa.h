// Compiles the kernel header named by DAT_CPU_KERNELS once per instruction set (see cpu_isa.h). Include
// it inside the op's namespace, after everything the kernels use:
//   #define DAT_CPU_KERNELS "deform_attn/cpu/deform_attn_cpu_kernels.h"
//   #include "common/cpu_kernels_for_each_isa.h"
// No include guard: each op's .cpp includes it once for its own kernels. common/cpu_isa.h must be included
// before, at file scope.
#ifndef DAT_CPU_ISA_CALL
#error "include common/cpu_isa.h at file scope before common/cpu_kernels_for_each_isa.h"
#endif

namespace baseline {
#include DAT_CPU_KERNELS
}  // namespace baseline

#ifdef DAT_CPU_AVX2_CLONES
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include DAT_CPU_KERNELS
}  // namespace avx2
#pragma GCC pop_options
#endif

#undef DAT_CPU_KERNELS
