// The hot loops of the dat::deform_attn CPU kernels. deform_attn_cpu.cpp includes this file once per
// instruction set (inside a namespace, under `#pragma GCC target`) and picks one at run time, so the
// auto-vectorised loops use AVX2/FMA where the CPU has them while the extension stays portable.
// Hence: no include guard and no #include here; everything it uses is declared before the inclusion.

// Buffers for one key tile, shared by the forward and the backward.
template <typename scalar_t>
struct KeyTileBuffers {
  std::vector<BilinearTaps<scalar_t>> taps;  // kQueryTile x kKeyTile
  std::vector<scalar_t> keys_t;              // head_dim x kKeyTile, keys transposed
  std::vector<scalar_t> scaled_query;        // head_dim
  std::vector<scalar_t> logits;              // kKeyTile

  explicit KeyTileBuffers(const Geometry& geometry)
      : taps(kQueryTile * kKeyTile), keys_t(geometry.head_dim * kKeyTile), scaled_query(geometry.head_dim),
        logits(kKeyTile) {}
};

// Taps of every (query, key) pair of the tile; the same for all heads of the group.
template <typename scalar_t>
void compute_pair_taps(const Operands<scalar_t>& ops, const QueryTile& tile, int64_t key_begin, int64_t key_count,
                       BilinearTaps<scalar_t>* taps) {
  const Geometry& geometry = ops.geometry;
  for (int64_t i = 0; i < tile.count; ++i) {
    const scalar_t* query_pos = ops.qpos + (tile.begin + i) * 2;
    for (int64_t j = 0; j < key_count; ++j) {
      const scalar_t* key_pos = ops.kpos + ops.kpos_offset(tile.batch, tile.group, key_begin + j);
      taps[i * kKeyTile + j] = bias_taps<scalar_t>(query_pos[0], query_pos[1], key_pos[0], key_pos[1],
                                                   geometry.table_height, geometry.table_width);
    }
  }
}

// (key_count x head_dim) rows -> (head_dim x kKeyTile), so that products against many keys run over
// contiguous memory and vectorise without reordering floating-point sums.
template <typename scalar_t>
void transpose_keys(const scalar_t* rows, int64_t key_count, int64_t head_dim, scalar_t* transposed) {
  for (int64_t j = 0; j < key_count; ++j) {
    for (int64_t d = 0; d < head_dim; ++d) transposed[d * kKeyTile + j] = rows[j * head_dim + d];
  }
}

// exp(x) for x <= ~0 (logit minus running max or logsumexp), written so that loops over it vectorise
// (libm's expf is one call per element): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// Taylor polynomial for e^r (relative error < 2e-7) and 2^n built in the exponent bits. float64 keeps
// libm's exp, for gradcheck-grade accuracy.
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(exponent_bits);
}

inline double exp_vectorisable(double x) { return exp_of(x); }

// y += alpha * x. The restrict qualifiers let the compiler vectorise without runtime alias checks.
template <typename scalar_t>
inline void add_scaled(int64_t n, scalar_t alpha, const scalar_t* __restrict__ x, scalar_t* __restrict__ y) {
  for (int64_t e = 0; e < n; ++e) y[e] += alpha * x[e];
}

// out[j] = sum_d vector[d] * transposed[d][j] for the first key_count keys.
template <typename scalar_t>
void products_with_keys(const scalar_t* vector, const scalar_t* transposed, int64_t key_count, int64_t head_dim,
                        scalar_t* out) {
  std::fill(out, out + key_count, scalar_t(0));
  for (int64_t d = 0; d < head_dim; ++d) add_scaled(key_count, vector[d], transposed + d * kKeyTile, out);
}

// Logits scale * <q_i, k_j> + bias_ij of one query against the keys in buffers.keys_t.
template <typename scalar_t>
void query_logits(const Operands<scalar_t>& ops, const scalar_t* query, const scalar_t* table,
                  const BilinearTaps<scalar_t>* query_taps, int64_t key_count, KeyTileBuffers<scalar_t>& buffers) {
  const Geometry& geometry = ops.geometry;
  for (int64_t d = 0; d < geometry.head_dim; ++d) buffers.scaled_query[d] = query[d] * ops.scale;
  products_with_keys(buffers.scaled_query.data(), buffers.keys_t.data(), key_count, geometry.head_dim,
                     buffers.logits.data());
  if (table != nullptr) {
    for (int64_t j = 0; j < key_count; ++j) {
      buffers.logits[j] += bilinear_sample(table, query_taps[j]);
    }
  }
}

template <typename scalar_t>
void forward_query_tile(const Operands<scalar_t>& ops, const QueryTile& tile, KeyTileBuffers<scalar_t>& buffers,
                        std::vector<scalar_t>& accumulators, std::vector<scalar_t>& running_max,
                        std::vector<scalar_t>& running_sum, scalar_t* out, scalar_t* logsumexp) {
  const Geometry& geometry = ops.geometry;
  const int64_t head_dim = geometry.head_dim;
  const int64_t heads_per_group = geometry.heads_per_group();
  std::fill(accumulators.begin(), accumulators.end(), scalar_t(0));
  std::fill(running_max.begin(), running_max.end(), -std::numeric_limits<scalar_t>::infinity());
  std::fill(running_sum.begin(), running_sum.end(), scalar_t(0));

  for (int64_t key_begin = 0; key_begin < geometry.keys; key_begin += kKeyTile) {
    const int64_t key_count = std::min(kKeyTile, geometry.keys - key_begin);
    if (ops.rpe != nullptr) compute_pair_taps(ops, tile, key_begin, key_count, buffers.taps.data());
    for (int64_t h = 0; h < heads_per_group; ++h) {
      const int64_t head = tile.group * heads_per_group + h;
      const scalar_t* keys = ops.k + ops.key_offset(tile.batch, head, key_begin);
      const scalar_t* values = ops.v + ops.key_offset(tile.batch, head, key_begin);
      const scalar_t* table = ops.rpe != nullptr ? ops.table(head) : nullptr;
      transpose_keys(keys, key_count, head_dim, buffers.keys_t.data());
      for (int64_t i = 0; i < tile.count; ++i) {
        const scalar_t* query = ops.q + ops.query_offset(tile.batch, head, tile.begin + i);
        query_logits(ops, query, table, buffers.taps.data() + i * kKeyTile, key_count, buffers);
        const scalar_t* logits = buffers.logits.data();
        const int64_t row = h * kQueryTile + i;
        scalar_t* accumulator = accumulators.data() + row * head_dim;
        const scalar_t block_max = *std::max_element(logits, logits + key_count);
        const scalar_t factor = online_softmax_rescale(running_max[row], running_sum[row], block_max);
        if (factor != scalar_t(1)) {
          for (int64_t d = 0; d < head_dim; ++d) accumulator[d] *= factor;
        }
        scalar_t* weights = buffers.logits.data();
        const scalar_t row_max = running_max[row];
        scalar_t weight_sum = 0;
#pragma omp simd reduction(+ : weight_sum)
        for (int64_t j = 0; j < key_count; ++j) {
          weights[j] = exp_vectorisable(weights[j] - row_max);
          weight_sum += weights[j];
        }
        running_sum[row] += weight_sum;
        for (int64_t j = 0; j < key_count; ++j) add_scaled(head_dim, weights[j], values + j * head_dim, accumulator);
      }
    }
  }

  for (int64_t h = 0; h < heads_per_group; ++h) {
    const int64_t head = tile.group * heads_per_group + h;
    for (int64_t i = 0; i < tile.count; ++i) {
      const int64_t row = h * kQueryTile + i;
      const int64_t query_offset = ops.query_offset(tile.batch, head, tile.begin + i);
      const scalar_t inverse_sum = scalar_t(1) / running_sum[row];
      for (int64_t d = 0; d < head_dim; ++d) {
        out[query_offset + d] = accumulators[row * head_dim + d] * inverse_sum;
      }
      logsumexp[query_offset / head_dim] = running_max[row] + log_of(running_sum[row]);
    }
  }
}

template <typename scalar_t>
void backward_query_tile(const Operands<scalar_t>& ops, const scalar_t* grad_out, const scalar_t* out,
                         const scalar_t* logsumexp, const QueryTile& tile, KeyTileBuffers<scalar_t>& buffers,
                         std::vector<scalar_t>& grad_queries, std::vector<scalar_t>& deltas,
                         std::vector<scalar_t>& values_t, std::vector<scalar_t>& grad_probs,
                         std::vector<scalar_t>& grad_key_pos, const GradientSinks<scalar_t>& sinks,
                         scalar_t* grad_q) {
  const Geometry& geometry = ops.geometry;
  const int64_t head_dim = geometry.head_dim;
  const int64_t heads_per_group = geometry.heads_per_group();
  std::fill(grad_queries.begin(), grad_queries.end(), scalar_t(0));
  for (int64_t h = 0; h < heads_per_group; ++h) {
    const int64_t head = tile.group * heads_per_group + h;
    for (int64_t i = 0; i < tile.count; ++i) {
      const int64_t offset = ops.query_offset(tile.batch, head, tile.begin + i);
      scalar_t delta = 0;
      for (int64_t d = 0; d < head_dim; ++d) delta += grad_out[offset + d] * out[offset + d];
      deltas[h * kQueryTile + i] = delta;
    }
  }

  for (int64_t key_begin = 0; key_begin < geometry.keys; key_begin += kKeyTile) {
    const int64_t key_count = std::min(kKeyTile, geometry.keys - key_begin);
    if (ops.rpe != nullptr) compute_pair_taps(ops, tile, key_begin, key_count, buffers.taps.data());
    std::fill(grad_key_pos.begin(), grad_key_pos.end(), scalar_t(0));
    for (int64_t h = 0; h < heads_per_group; ++h) {
      const int64_t head = tile.group * heads_per_group + h;
      const int64_t key_offset = ops.key_offset(tile.batch, head, key_begin);
      const scalar_t* keys = ops.k + key_offset;
      const scalar_t* table = ops.rpe != nullptr ? ops.table(head) : nullptr;
      scalar_t* grad_table = ops.rpe != nullptr ? sinks.rpe + head * ops.table_size() : nullptr;
      transpose_keys(keys, key_count, head_dim, buffers.keys_t.data());
      transpose_keys(ops.v + key_offset, key_count, head_dim, values_t.data());
      for (int64_t i = 0; i < tile.count; ++i) {
        const int64_t query_offset = ops.query_offset(tile.batch, head, tile.begin + i);
        const scalar_t* query = ops.q + query_offset;
        const scalar_t* query_grad_out = grad_out + query_offset;
        const BilinearTaps<scalar_t>* query_taps = buffers.taps.data() + i * kKeyTile;
        query_logits(ops, query, table, query_taps, key_count, buffers);
        products_with_keys(query_grad_out, values_t.data(), key_count, head_dim, grad_probs.data());
        const int64_t row = h * kQueryTile + i;
        const scalar_t row_logsumexp = logsumexp[query_offset / head_dim];
        scalar_t* grad_query = grad_queries.data() + row * head_dim;
        // Probabilities overwrite the logits, logit gradients the probability gradients.
        scalar_t* probs = buffers.logits.data();
        scalar_t* grad_logits = grad_probs.data();
        const scalar_t row_delta = deltas[row];
#pragma omp simd
        for (int64_t j = 0; j < key_count; ++j) {
          probs[j] = exp_vectorisable(probs[j] - row_logsumexp);
          grad_logits[j] = softmax_logit_grad(probs[j], grad_logits[j], row_delta);
        }
        for (int64_t j = 0; j < key_count; ++j) {
          const scalar_t prob = probs[j];
          const scalar_t grad_logit = grad_logits[j];
          const int64_t key_row = key_offset + j * head_dim;
          add_scaled(head_dim, grad_logit, keys + j * head_dim, grad_query);
          add_scaled(head_dim, grad_logit * ops.scale, query, sinks.k + key_row);
          add_scaled(head_dim, prob, query_grad_out, sinks.v + key_row);
          if (table != nullptr) {
            bilinear_sample_backward(
                table, geometry.table_height, geometry.table_width, query_taps[j], grad_logit,
                AddToTable<scalar_t>{grad_table}, grad_key_pos[2 * j],
                grad_key_pos[2 * j + 1]);
          }
        }
      }
    }
    if (ops.rpe != nullptr) {
      scalar_t* grad_kpos = sinks.kpos + ops.kpos_offset(tile.batch, tile.group, key_begin);
      const scalar_t per_position = -scalar_t(kDisplacementPerPosition);
      for (int64_t e = 0; e < 2 * key_count; ++e) grad_kpos[e] += per_position * grad_key_pos[e];
    }
  }

  for (int64_t h = 0; h < heads_per_group; ++h) {
    const int64_t head = tile.group * heads_per_group + h;
    for (int64_t i = 0; i < tile.count; ++i) {
      const int64_t offset = ops.query_offset(tile.batch, head, tile.begin + i);
      const scalar_t* grad_query = grad_queries.data() + (h * kQueryTile + i) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) grad_q[offset + d] = grad_query[d] * ops.scale;
    }
  }
}

// Forward of query tiles [begin, end).
template <typename scalar_t>
void forward_tiles(const Operands<scalar_t>& ops, int64_t begin, int64_t end, scalar_t* out, scalar_t* logsumexp) {
  const Geometry& geometry = ops.geometry;
  const int64_t rows = geometry.heads_per_group() * kQueryTile;
  KeyTileBuffers<scalar_t> buffers(geometry);
  std::vector<scalar_t> accumulators(rows * geometry.head_dim), running_max(rows), running_sum(rows);
  for (int64_t index = begin; index < end; ++index) {
    forward_query_tile(ops, query_tile(index, geometry), buffers, accumulators, running_max, running_sum, out,
                       logsumexp);
  }
}

// Backward of query tiles [begin, end); key-side gradients go to `sinks`.
template <typename scalar_t>
void backward_tiles(const Operands<scalar_t>& ops, const scalar_t* grad_out, const scalar_t* out,
                    const scalar_t* logsumexp, int64_t begin, int64_t end, const GradientSinks<scalar_t>& sinks,
                    scalar_t* grad_q) {
  const Geometry& geometry = ops.geometry;
  const int64_t rows = geometry.heads_per_group() * kQueryTile;
  KeyTileBuffers<scalar_t> buffers(geometry);
  std::vector<scalar_t> grad_queries(rows * geometry.head_dim), deltas(rows);
  std::vector<scalar_t> values_t(geometry.head_dim * kKeyTile), grad_probs(kKeyTile);
  std::vector<scalar_t> grad_key_pos(2 * kKeyTile);
  for (int64_t index = begin; index < end; ++index) {
    backward_query_tile(ops, grad_out, out, logsumexp, query_tile(index, geometry), buffers, grad_queries, deltas,
                        values_t, grad_probs, grad_key_pos, sinks, grad_q);
  }
}
