// The row loops of the dat::neighborhood_attn CPU kernels, compiled once per instruction set
// (common/cpu_isa.h): no include guard and no #include here; everything it uses is declared before it.

template <typename acc_t, typename scalar_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return sum;
}

template <typename acc_t, typename scalar_t>
inline void add_scaled(acc_t* accum, acc_t weight, const scalar_t* row, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) accum[i] += weight * static_cast<acc_t>(row[i]);
}

template <typename acc_t, typename scalar_t>
inline void store_scaled(scalar_t* destination, const acc_t* accum, acc_t factor, int64_t n) {
  for (int64_t i = 0; i < n; ++i) destination[i] = static_cast<scalar_t>(accum[i] * factor);
}

template <typename scalar_t>
void forward_rows(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* rpb, scalar_t* out,
                  at::opmath_type<scalar_t>* attn, const Problem& g, const AxisTable& rows_table,
                  const AxisTable& columns_table, at::opmath_type<scalar_t> scale, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kernel_size, D = g.dim, W = g.width, H = g.height;
  std::vector<acc_t> accum(D);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    const int64_t y0 = rows_table.start[y];
    const scalar_t* bias_rows =
        rpb + (plane % g.heads) * g.table_side() * g.table_side() + bias_offset(y, y0, K, g.dilation) * g.table_side();
    for (int64_t x = 0; x < W; ++x) {
      const int64_t query = row * W + x;
      const int64_t x0 = columns_table.start[x];
      const scalar_t* bias = bias_rows + bias_offset(x, x0, K, g.dilation);
      const scalar_t* q_i = q + query * D;
      acc_t* logits = attn + query * g.window();
      acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
      for (int64_t ty = 0; ty < K; ++ty) {
        const int64_t key_row = (plane * H + y0 + ty * g.dilation) * W;
        for (int64_t tx = 0; tx < K; ++tx) {
          const acc_t logit = dot<acc_t>(q_i, k + (key_row + x0 + tx * g.dilation) * D, D) * scale +
                              static_cast<acc_t>(bias[ty * g.table_side() + tx]);
          logits[ty * K + tx] = logit;
          max_logit = std::max(max_logit, logit);
        }
      }
      acc_t total = 0;
      for (int64_t t = 0; t < g.window(); ++t) {
        logits[t] = std::exp(logits[t] - max_logit);
        total += logits[t];
      }
      std::fill(accum.begin(), accum.end(), acc_t(0));
      for (int64_t ty = 0; ty < K; ++ty) {
        const int64_t key_row = (plane * H + y0 + ty * g.dilation) * W;
        for (int64_t tx = 0; tx < K; ++tx) {
          acc_t& probability = logits[ty * K + tx];
          probability /= total;
          add_scaled(accum.data(), probability, v + (key_row + x0 + tx * g.dilation) * D, D);
        }
      }
      store_scaled(out + query * D, accum.data(), acc_t(1), D);
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
  const int64_t K = g.kernel_size, D = g.dim, W = g.width, H = g.height;
  std::vector<acc_t> accum(D);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    const int64_t y0 = rows_table.start[y];
    for (int64_t x = 0; x < W; ++x) {
      const int64_t query = row * W + x;
      const int64_t x0 = columns_table.start[x];
      const acc_t* probabilities = attn + query * g.window();
      acc_t* dS = grad_logits + query * g.window();
      acc_t expected = 0;
      for (int64_t ty = 0; ty < K; ++ty) {
        const int64_t key_row = (plane * H + y0 + ty * g.dilation) * W;
        for (int64_t tx = 0; tx < K; ++tx) {
          const int64_t t = ty * K + tx;
          dS[t] = dot<acc_t>(grad_out + query * D, v + (key_row + x0 + tx * g.dilation) * D, D);
          expected += probabilities[t] * dS[t];
        }
      }
      std::fill(accum.begin(), accum.end(), acc_t(0));
      for (int64_t ty = 0; ty < K; ++ty) {
        const int64_t key_row = (plane * H + y0 + ty * g.dilation) * W;
        for (int64_t tx = 0; tx < K; ++tx) {
          const int64_t t = ty * K + tx;
          dS[t] = probabilities[t] * (dS[t] - expected);
          add_scaled(accum.data(), dS[t], k + (key_row + x0 + tx * g.dilation) * D, D);
        }
      }
      store_scaled(grad_q + query * D, accum.data(), scale, D);
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
  std::vector<acc_t> accum_k(D), accum_v(D);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t plane = row / H, y = row % H;
    const QueryRange rows_attending = rows_table.attending[y];
    const int64_t* row_slots = rows_table.slot_in_attending.data() + y * rows_table.max_run;
    for (int64_t x = 0; x < W; ++x) {
      const QueryRange columns_attending = columns_table.attending[x];
      const int64_t* column_slots = columns_table.slot_in_attending.data() + x * columns_table.max_run;
      std::fill(accum_k.begin(), accum_k.end(), acc_t(0));
      std::fill(accum_v.begin(), accum_v.end(), acc_t(0));
      for (int64_t qy = rows_attending.first, ny = 0; qy <= rows_attending.last; qy += d, ++ny) {
        for (int64_t qx = columns_attending.first, nx = 0; qx <= columns_attending.last; qx += d, ++nx) {
          const int64_t query = (plane * H + qy) * W + qx;
          const int64_t slot = query * g.window() + row_slots[ny] * K + column_slots[nx];
          add_scaled(accum_k.data(), grad_logits[slot], q + query * D, D);
          add_scaled(accum_v.data(), attn[slot], grad_out + query * D, D);
        }
      }
      const int64_t key = row * W + x;
      store_scaled(grad_k + key * D, accum_k.data(), scale, D);
      store_scaled(grad_v + key * D, accum_v.data(), acc_t(1), D);
    }
  }
}
