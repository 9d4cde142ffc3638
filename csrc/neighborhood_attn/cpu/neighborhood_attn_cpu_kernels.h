// The row loops of the dat::neighborhood_attn CPU kernels, compiled once per instruction set
// (common/cpu_isa.h): no include guard and no #include here; everything it uses is declared before it.

// The inner loops hold their sums in 32-byte vectors (GCC's vector extensions: AVX registers in the AVX2 clone,
// pairs of SSE registers in the baseline one), so that they stay in registers across a window; a window's dot
// products go four keys at a time, and the softmax takes its exponentials a vector at a time (common/cpu_exp.h).
// The kernels before sent each query's output through memory once per key, ended each dot product in a chain of
// scalar adds and called expf once per key. scripts/benchmark_nat.py at DAT++-T's stage sizes (batch 8, 224x224,
// 2 threads), fused against the reference in the same run: forward 6.9x-8.7x before, 12x-16x after;
// forward+backward 9.9x-16x before, 20x-26x after.
template <typename acc_t>
struct Vectors {
  typedef acc_t type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(acc_t);
  // Four vectors per chunk of channels: four independent multiply-adds per step.
  static constexpr int64_t chunk = 4 * lanes;
};

template <typename acc_t, typename scalar_t>
inline typename Vectors<acc_t>::type load_vector(const scalar_t* values) {
  typename Vectors<acc_t>::type vector;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    __builtin_memcpy(&vector, values, sizeof(vector));
  } else {
    for (int64_t i = 0; i < Vectors<acc_t>::lanes; ++i) vector[i] = static_cast<acc_t>(values[i]);
  }
  return vector;
}

// {sum of v[0]'s lanes, ..., sum of v[3]'s lanes}: for eight lanes, two rounds of pairwise adds within 128-bit
// halves and one across them, instead of four chains of seven adds.
// (__builtin_shufflevector: Clang, and GCC from 12 on; older GCC sums lane by lane.)
template <typename acc_t>
inline void lane_sums(const typename Vectors<acc_t>::type (&v)[4], acc_t* sums) {
#if defined(__clang__) || __GNUC__ >= 12
  if constexpr (Vectors<acc_t>::lanes == 8) {
    const auto pairs = [](auto a, auto b) {
      return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
             __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
    };
    // [sums of lanes 0-3 of v0, v1, v2, v3, then of lanes 4-7 of each]
    const auto quarters = pairs(pairs(v[0], v[1]), pairs(v[2], v[3]));
    for (int64_t j = 0; j < 4; ++j) sums[j] = quarters[j] + quarters[j + 4];
    return;
  }
#endif
  for (int64_t j = 0; j < 4; ++j) {
    sums[j] = 0;
    for (int64_t l = 0; l < Vectors<acc_t>::lanes; ++l) sums[j] += v[j][l];
  }
}

// dots[t] = <a, rows + keys[t] * channels> over the channels, for t < count: four keys at a time, a's vectors
// loaded once per four keys and their four sums reduced together.
template <typename acc_t, typename scalar_t>
inline void window_dots(const scalar_t* a, const scalar_t* rows, const int64_t* keys, int64_t count,
                        int64_t channels, acc_t* dots) {
  using V = typename Vectors<acc_t>::type;
  constexpr int64_t L = Vectors<acc_t>::lanes;
  const int64_t vectorized = channels / L * L;
  for (int64_t first = 0; first < count; first += 4) {
    const scalar_t* key_rows[4];
    for (int64_t j = 0; j < 4; ++j) key_rows[j] = rows + keys[std::min(first + j, count - 1)] * channels;
    V part[4] = {};
    for (int64_t c = 0; c < vectorized; c += L) {
      const V a_c = load_vector<acc_t>(a + c);
      for (int64_t j = 0; j < 4; ++j) part[j] += a_c * load_vector<acc_t>(key_rows[j] + c);
    }
    acc_t sums[4];
    lane_sums<acc_t>(part, sums);
    for (int64_t j = 0; j < 4 && first + j < count; ++j) {
      for (int64_t c = vectorized; c < channels; ++c) {
        sums[j] += static_cast<acc_t>(a[c]) * static_cast<acc_t>(key_rows[j][c]);
      }
      dots[first + j] = sums[j];
    }
  }
}

// destination[c] = factor * sum over n < count of weight(n) * row(n)[c], for c < channels, a chunk of channels at a
// time.
template <typename acc_t, typename scalar_t, typename Weight, typename Row>
inline void weighted_sum(int64_t count, const Weight& weight, const Row& row, int64_t channels, acc_t factor,
                         scalar_t* destination) {
  using V = typename Vectors<acc_t>::type;
  constexpr int64_t L = Vectors<acc_t>::lanes;
  int64_t first = 0;
  for (; first + Vectors<acc_t>::chunk <= channels; first += Vectors<acc_t>::chunk) {
    V sum[4] = {};
    for (int64_t n = 0; n < count; ++n) {
      const acc_t w = weight(n);
      const scalar_t* values = row(n) + first;
      for (int64_t j = 0; j < 4; ++j) sum[j] += w * load_vector<acc_t>(values + j * L);
    }
    for (int64_t j = 0; j < 4; ++j) {
      for (int64_t l = 0; l < L; ++l) destination[first + j * L + l] = static_cast<scalar_t>(sum[j][l] * factor);
    }
  }
  for (int64_t c = first; c < channels; ++c) {
    acc_t sum = 0;
    for (int64_t n = 0; n < count; ++n) sum += weight(n) * static_cast<acc_t>(row(n)[c]);
    destination[c] = static_cast<scalar_t>(sum * factor);
  }
}

// values[t] = exp(values[t] - shift) for t < count (common/cpu_exp.h); returns their sum.
template <typename acc_t>
inline acc_t exp_shifted(acc_t* values, int64_t count, acc_t shift) {
  acc_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t t = 0; t < count; ++t) {
    values[t] = exp_vectorisable(values[t] - shift);
    total += values[t];
  }
  return total;
}

// Indices (plane * H + key row) * W + key column of the keys of query (y, x)'s window, slot by slot.
inline void window_keys(const Problem& g, const AxisTable& rows_table, const AxisTable& columns_table, int64_t plane,
                        int64_t y, int64_t x, int64_t* __restrict__ keys) {
  const int64_t K = g.kernel_size, dilation = g.dilation;
  const int64_t first_row = plane * g.height + rows_table.start[y], first_column = columns_table.start[x];
  for (int64_t ty = 0; ty < K; ++ty) {
    const int64_t row_start = (first_row + ty * dilation) * g.width + first_column;
    for (int64_t tx = 0; tx < K; ++tx) keys[ty * K + tx] = row_start + tx * dilation;
  }
}

template <typename scalar_t>
void forward_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* rpb, scalar_t* out,
                  at::opmath_type<scalar_t>* attn, const Problem& g, const AxisTable& rows_table,
                  const AxisTable& columns_table, at::opmath_type<scalar_t> scale, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel_size, D = g.dim, W = g.width, H = g.height;
  std::vector<int64_t> keys(g.window());
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    const int64_t y0 = rows_table.start[y];
    const scalar_t* bias_rows =
        rpb + (plane % g.heads) * g.table_side() * g.table_side() + bias_offset(y, y0, K, g.dilation) * g.table_side();
    for (int64_t x = 0; x < W; ++x) {
      const int64_t query = row * W + x;
      window_keys(g, rows_table, columns_table, plane, y, x, keys.data());
      const scalar_t* bias = bias_rows + bias_offset(x, columns_table.start[x], K, g.dilation);
      const scalar_t* q_i = q + query * D;
      acc_t* probabilities = attn + query * g.window();
      window_dots(q_i, k, keys.data(), g.window(), D, probabilities);
      acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
      for (int64_t ty = 0; ty < K; ++ty) {
        for (int64_t tx = 0; tx < K; ++tx) {
          acc_t& logit = probabilities[ty * K + tx];
          logit = logit * scale + static_cast<acc_t>(bias[ty * g.table_side() + tx]);
          max_logit = std::max(max_logit, logit);
        }
      }
      const acc_t normalizer = acc_t(1) / exp_shifted(probabilities, g.window(), max_logit);
      for (int64_t t = 0; t < g.window(); ++t) probabilities[t] *= normalizer;
      weighted_sum(g.window(), [&](int64_t t) { return probabilities[t]; }, [&](int64_t t) { return v + keys[t] * D; },
                   D, acc_t(1), out + query * D);
    }
  }
}

// Gradient of the logits, dS = P * (dP - sum(P * dP)) with dP = <grad_out_i, v_j>, and of q.
template <typename scalar_t>
void query_side_backward_rows(const scalar_t* grad_out, const scalar_t* k, const scalar_t* v,
                              const at::opmath_type<scalar_t>* attn, at::opmath_type<scalar_t>* grad_logits,
                              scalar_t* grad_q, const Problem& g, const AxisTable& rows_table,
                              const AxisTable& columns_table, at::opmath_type<scalar_t> scale, int64_t begin,
                              int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = g.dim, W = g.width, H = g.height;
  std::vector<int64_t> keys(g.window());
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t query = row * W + x;
      window_keys(g, rows_table, columns_table, plane, y, x, keys.data());
      const acc_t* probabilities = attn + query * g.window();
      acc_t* dS = grad_logits + query * g.window();
      window_dots(grad_out + query * D, v, keys.data(), g.window(), D, dS);
      acc_t expected = 0;
      for (int64_t t = 0; t < g.window(); ++t) expected += probabilities[t] * dS[t];
      for (int64_t t = 0; t < g.window(); ++t) dS[t] = probabilities[t] * (dS[t] - expected);
      weighted_sum(g.window(), [&](int64_t t) { return dS[t]; }, [&](int64_t t) { return k + keys[t] * D; }, D, scale,
                   grad_q + query * D);
    }
  }
}

// Gradients of k and v, gathered per key over the queries whose windows hold it.
template <typename scalar_t>
void key_side_backward_rows(const scalar_t* grad_out, const scalar_t* q, const at::opmath_type<scalar_t>* attn,
                            const at::opmath_type<scalar_t>* grad_logits, scalar_t* grad_k, scalar_t* grad_v,
                            const Problem& g, const AxisTable& rows_table, const AxisTable& columns_table,
                            at::opmath_type<scalar_t> scale, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel_size, D = g.dim, W = g.width, H = g.height, d = g.dilation;
  // the queries whose windows hold the key, and the key's slot in each of their windows
  std::vector<int64_t> queries(rows_table.max_run * columns_table.max_run), slots(queries.size());
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    const QueryRange rows_attending = rows_table.attending[y];
    const int64_t* row_slots = rows_table.slot_in_attending.data() + y * rows_table.max_run;
    for (int64_t x = 0; x < W; ++x) {
      const QueryRange columns_attending = columns_table.attending[x];
      const int64_t* column_slots = columns_table.slot_in_attending.data() + x * columns_table.max_run;
      int64_t count = 0;
      for (int64_t qy = rows_attending.first, ny = 0; qy <= rows_attending.last; qy += d, ++ny) {
        for (int64_t qx = columns_attending.first, nx = 0; qx <= columns_attending.last; qx += d, ++nx, ++count) {
          queries[count] = (plane * H + qy) * W + qx;
          slots[count] = queries[count] * g.window() + row_slots[ny] * K + column_slots[nx];
        }
      }
      const int64_t key = row * W + x;
      weighted_sum(count, [&](int64_t n) { return grad_logits[slots[n]]; },
                   [&](int64_t n) { return q + queries[n] * D; }, D, scale, grad_k + key * D);
      weighted_sum(count, [&](int64_t n) { return attn[slots[n]]; },
                   [&](int64_t n) { return grad_out + queries[n] * D; }, D, acc_t(1), grad_v + key * D);
    }
  }
}
