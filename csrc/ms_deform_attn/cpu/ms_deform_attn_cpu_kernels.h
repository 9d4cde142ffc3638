// The sampling loops of the dat::ms_deform_attn CPU kernels, compiled once per instruction set
// (common/cpu_isa.h): no include guard and no #include here; everything it uses is declared before it.

// Samples per parallel_for grain in the forward pass; small enough to split Deformable DETR's
// decoder (300 queries) over a handful of threads.
constexpr int64_t kForwardGrainSamples = 1024;

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void forward_kernel(const scalar_t* value, const acc_t* locations, const acc_t* weights, scalar_t* output,
                    const LevelLayout& layout, const Problem& size) {
  const int64_t heads = size.heads, channels = size.channels, levels = size.levels, points = size.points;
  const int64_t pixel_stride = heads * channels;
  const int64_t rows = size.batch * size.queries;
  const int64_t samples_per_row = heads * levels * points;
  const int64_t grain = std::max<int64_t>(1, kForwardGrainSamples / std::max<int64_t>(1, samples_per_row));
  at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> accumulator(channels);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t batch = row / size.queries;
      for (int64_t head = 0; head < heads; ++head) {
        std::fill(accumulator.begin(), accumulator.end(), static_cast<acc_t>(0));
        const int64_t head_sample = (row * heads + head) * levels * points;
        for (int64_t level = 0; level < levels; ++level) {
          const scalar_t* level_value =
              value + ((batch * size.value_len + layout.start[level]) * heads + head) * channels;
          for (int64_t point = 0; point < points; ++point) {
            const int64_t sample = head_sample + level * points + point;
            const auto stencil = sample_stencil<acc_t>(locations, sample, layout.height[level], layout.width[level]);
            const acc_t attention = weights[sample];
            for (int k = 0; k < kTaps; ++k) {
              if (!stencil.inside[k]) continue;
              const acc_t tap_weight = attention * stencil.weight[k];
              const scalar_t* tap = level_value + stencil.pixel[k] * pixel_stride;
              for (int64_t c = 0; c < channels; ++c) accumulator[c] += tap_weight * static_cast<acc_t>(tap[c]);
            }
          }
        }
        scalar_t* out = output + (row * heads + head) * channels;
        for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<scalar_t>(accumulator[c]);
      }
    }
  });
}

// grad_value is written in the value's dtype: in place when that is acc_t (it must be zero on entry),
// else each task sums its slice in acc_t and writes every element of it, rounded once, at the end. Location and weight gradients are written in acc_t (the caller
// rounds them to their inputs' dtypes).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const acc_t* locations, const acc_t* weights,
                     scalar_t* grad_value, acc_t* grad_locations, acc_t* grad_weights, const LevelLayout& layout,
                     const Problem& size) {
  const int64_t heads = size.heads, channels = size.channels, levels = size.levels, points = size.points;
  const int64_t pixel_stride = heads * channels;
  at::parallel_for(0, size.batch * heads * levels, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<acc_t> slice_sums;  // a half-precision task's value gradients, (pixels, channels)
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t level = task % levels;
      const int64_t head = (task / levels) % heads;
      const int64_t batch = task / (levels * heads);
      const int64_t level_offset = ((batch * size.value_len + layout.start[level]) * heads + head) * channels;
      const int64_t level_pixels = layout.height[level] * layout.width[level];
      const scalar_t* level_value = value + level_offset;
      // Where this task sums the value gradients of its slice, and the distance between two pixels there.
      acc_t* level_grad_value;
      int64_t grad_pixel_stride;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        level_grad_value = grad_value + level_offset;
        grad_pixel_stride = pixel_stride;
      } else {
        slice_sums.assign(level_pixels * channels, acc_t(0));
        level_grad_value = slice_sums.data();
        grad_pixel_stride = channels;
      }
      for (int64_t query = 0; query < size.queries; ++query) {
        const int64_t row = (batch * size.queries + query) * heads + head;
        const scalar_t* grad_out = grad_output + row * channels;
        for (int64_t point = 0; point < points; ++point) {
          const int64_t sample = (row * levels + level) * points + point;
          const auto stencil = sample_stencil<acc_t>(locations, sample, layout.height[level], layout.width[level]);
          const acc_t attention = weights[sample];
          acc_t tap_dot[kTaps] = {0, 0, 0, 0};
          for (int k = 0; k < kTaps; ++k) {
            if (!stencil.inside[k]) continue;
            const acc_t tap_weight = attention * stencil.weight[k];
            const scalar_t* tap = level_value + stencil.pixel[k] * pixel_stride;
            acc_t* grad_tap = level_grad_value + stencil.pixel[k] * grad_pixel_stride;
            acc_t dot = 0;
            for (int64_t c = 0; c < channels; ++c) {
              const acc_t grad = static_cast<acc_t>(grad_out[c]);
              dot += grad * static_cast<acc_t>(tap[c]);
              grad_tap[c] += tap_weight * grad;
            }
            tap_dot[k] = dot;
          }
          const auto grads = sample_gradients<acc_t>(stencil, tap_dot, attention);
          grad_weights[sample] = grads.attention_weight;
          grad_locations[2 * sample] = grads.x;
          grad_locations[2 * sample + 1] = grads.y;
        }
      }
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t pixel = 0; pixel < level_pixels; ++pixel) {
          scalar_t* grad_pixel = grad_value + level_offset + pixel * pixel_stride;
          const acc_t* sums = slice_sums.data() + pixel * channels;
          for (int64_t c = 0; c < channels; ++c) grad_pixel[c] = static_cast<scalar_t>(sums[c]);
        }
      }
    }
  });
}
