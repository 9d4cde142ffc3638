// The operator namespace that every schema and kernel of dat registers in.
//
// The emulated CUDA test tier (tests/emulated/) compiles the same sources a second time, as C++ against
// HIP-CPU, into a library of its own; it sets DAT_OP_NAMESPACE to dat_emulated so that both libraries can
// be loaded in one process without defining an op twice.
#pragma once

#include <torch/library.h>

#ifndef DAT_OP_NAMESPACE
#define DAT_OP_NAMESPACE dat
#endif
