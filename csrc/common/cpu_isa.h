// The one way dat's CPU kernels use AVX2 + FMA while the extension stays portable.
//
// An op keeps its hot loops in a header of their own (<op>_cpu_kernels.h: no include guard, no #include,
// everything it uses declared before it) and includes that header through cpu_kernels_for_each_isa.h,
// which compiles it twice: into namespace `baseline` for the build's instruction set and, on x86-64 with
// GCC, into namespace `avx2` under `#pragma GCC target("avx2,fma")`. DAT_CPU_ISA_CALL(fn, args...) then
// calls avx2::fn or baseline::fn by what this CPU supports, checked once per process.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DAT_CPU_AVX2_CLONES 1
#endif

namespace dat {

inline bool cpu_has_avx2_fma() {
#ifdef DAT_CPU_AVX2_CLONES
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

}  // namespace dat

#ifdef DAT_CPU_AVX2_CLONES
#define DAT_CPU_ISA_CALL(fn, ...) (::dat::cpu_has_avx2_fma() ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__))
#else
#define DAT_CPU_ISA_CALL(fn, ...) baseline::fn(__VA_ARGS__)
#endif
