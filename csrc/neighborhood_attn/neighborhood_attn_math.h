// Window geometry of 2-D neighborhood attention, shared by the CPU and CUDA kernels.
//
// Along one axis of length L, with odd kernel size k and dilation d (L >= k * d), query i attends to
// the k keys of its dilation group {g, g + d, g + 2d, ...}, g = i % d. Inside the group, whose length
// is Lg, the query sits at position i / d and its window starts at clamp(i / d - k / 2, 0, Lg - k):
// windows slide with the query in the interior and stop at the borders (no padding). Key t of the
// window is at group position start + t, axis index (start + t) * d + g. The relative-position bias of
// that key is read at (key position - query position) + k - 1 in [0, 2k - 2], per axis.
// This is the rule of natten 0.14 (get_window_start / get_pb_start), written in group coordinates.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace dat {
namespace neighborhood_attn {

// Sizes of one call; tensors are contiguous (B, heads, H, W, dim), attention (B, heads, H, W, k*k).
struct Problem {
  int64_t batch, heads, height, width, dim, kernel_size, dilation;
  // (batch, head, row, column) positions; not numel / dim, which divides by zero when dim is 0.
  C10_HOST_DEVICE int64_t queries() const { return batch * heads * height * width; }
  C10_HOST_DEVICE int64_t window() const { return kernel_size * kernel_size; }
  C10_HOST_DEVICE int64_t table_side() const { return 2 * kernel_size - 1; }
};

C10_HOST_DEVICE inline int64_t group_length(int64_t length, int64_t dilation, int64_t group) {
  return (length - group + dilation - 1) / dilation;
}

// Group position of the first key of the window of the query at group position `position`.
C10_HOST_DEVICE inline int64_t window_start_in_group(int64_t position, int64_t group_len, int64_t kernel_size) {
  int64_t start = position - kernel_size / 2;
  if (start > group_len - kernel_size) start = group_len - kernel_size;
  return start < 0 ? 0 : start;
}

// Axis index of the first key of query `index`'s window; later keys follow every `dilation` indices.
C10_HOST_DEVICE inline int64_t window_start(int64_t index, int64_t length, int64_t kernel_size, int64_t dilation) {
  const int64_t group = index % dilation;
  const int64_t start = window_start_in_group(index / dilation, group_length(length, dilation, group), kernel_size);
  return start * dilation + group;
}

// Index along one axis of the bias table for key `key_index` seen from query `index` (same group).
C10_HOST_DEVICE inline int64_t bias_offset(int64_t index, int64_t key_index, int64_t kernel_size, int64_t dilation) {
  return (key_index - index) / dilation + kernel_size - 1;
}

// The queries whose windows hold key `key_index` form a contiguous run of group positions (window
// starts never decrease along the axis); they lie within k - 1 positions of the key. Returns the run
// as axis indices [first, last], stepping by `dilation`.
struct QueryRange {
  int64_t first;
  int64_t last;
};

C10_HOST_DEVICE inline QueryRange queries_attending(int64_t key_index, int64_t length, int64_t kernel_size,
                                                    int64_t dilation) {
  const int64_t group = key_index % dilation;
  const int64_t group_len = group_length(length, dilation, group);
  const int64_t key_position = key_index / dilation;
  int64_t first = group_len;
  int64_t last = -1;
  const int64_t lowest = key_position - kernel_size + 1 < 0 ? 0 : key_position - kernel_size + 1;
  const int64_t highest = key_position + kernel_size - 1 > group_len - 1 ? group_len - 1 : key_position + kernel_size - 1;
  for (int64_t position = lowest; position <= highest; ++position) {
    const int64_t start = window_start_in_group(position, group_len, kernel_size);
    if (start <= key_position && key_position < start + kernel_size) {
      if (position < first) first = position;
      last = position;
    }
  }
  return {first * dilation + group, last * dilation + group};
}

// Window slot along one axis of the key `offset` group positions away from query `index`, or -1 when
// that key is outside the query's window. Used to gather bias gradients per table entry.
C10_HOST_DEVICE inline int64_t window_slot(int64_t index, int64_t offset, int64_t length, int64_t kernel_size,
                                           int64_t dilation) {
  const int64_t group = index % dilation;
  const int64_t position = index / dilation;
  const int64_t slot = position + offset - window_start_in_group(position, group_length(length, dilation, group),
                                                                 kernel_size);
  return (slot >= 0 && slot < kernel_size) ? slot : -1;
}

}  // namespace neighborhood_attn
}  // namespace dat
