// The hot loops of the dat::deform_attn CPU kernels, compiled once per instruction set
// (common/cpu_isa.h): no include guard and no #include here; everything it uses is declared before it.

// The table cell and in-cell position of every (query, key) pair of a tile; the same for all heads
// of the offset group. Pairs outside the table get cell 0 (all-zero coefficients) and position 0.
template <typename scalar_t, typename input_t>
void locate_pairs(const Operands<scalar_t, input_t>& ops, const Tile& queries, const Tile& keys,
                  const scalar_t* key_pos, PairCells<scalar_t>& pairs) {
  const Problem& geometry = ops.geometry;
  const int64_t height = geometry.table_height, width = geometry.table_width;
  const scalar_t row_limit = scalar_t(height), col_limit = scalar_t(width);
  const int32_t cell_columns = static_cast<int32_t>(ops.cells.columns);
  const scalar_t half = scalar_t(kDisplacementPerPosition);
  const scalar_t row_scale = pixel_per_unit<scalar_t>(height), col_scale = pixel_per_unit<scalar_t>(width);
  for (int64_t i = 0; i < queries.count; ++i) {
    const scalar_t query_row = ops.qpos[(queries.begin + i) * 2], query_col = ops.qpos[(queries.begin + i) * 2 + 1];
    int32_t* __restrict__ cell = pairs.cell.data() + i * keys.count;
    scalar_t* __restrict__ frac_row = pairs.frac_row.data() + i * keys.count;
    scalar_t* __restrict__ frac_col = pairs.frac_col.data() + i * keys.count;
#pragma omp simd
    for (int64_t j = 0; j < keys.count; ++j) {
      // The cell rule of the CUDA kernel's bias_taps (deform_attn_cuda.cu), in the shared math of
      // deform_attn_math.h: pixel = (displacement + 1) * (size - 1) / 2, in reach for -1 <= pixel < size.
      const scalar_t pixel_row = ((query_row - key_pos[2 * j]) * half + scalar_t(1)) * row_scale;
      const scalar_t pixel_col = ((query_col - key_pos[2 * j + 1]) * half + scalar_t(1)) * col_scale;
      const bool inside = cell_in_reach(pixel_row, row_limit) & cell_in_reach(pixel_col, col_limit);
      const scalar_t row = floor_of(inside ? pixel_row : scalar_t(0));
      const scalar_t col = floor_of(inside ? pixel_col : scalar_t(0));
      cell[j] = inside ? (static_cast<int32_t>(row) + kCellPadding) * cell_columns + static_cast<int32_t>(col) +
                             kCellPadding
                       : 0;
      frac_row[j] = inside ? pixel_row - row : scalar_t(0);
      frac_col[j] = inside ? pixel_col - col : scalar_t(0);
    }
  }
}

// logits[i][j] += bias of pair (i, j) for one head.
template <typename scalar_t>
void add_bias(const scalar_t* __restrict__ coefficients, const PairCells<scalar_t>& pairs, int64_t count,
              scalar_t* __restrict__ logits) {
  const int32_t* __restrict__ cell = pairs.cell.data();
  const scalar_t* __restrict__ frac_row = pairs.frac_row.data();
  const scalar_t* __restrict__ frac_col = pairs.frac_col.data();
#pragma omp simd
  for (int64_t e = 0; e < count; ++e) {
    const int32_t c = 4 * cell[e];
    logits[e] += coefficients[c] + coefficients[c + 1] * frac_row[e] + coefficients[c + 2] * frac_col[e] +
                 coefficients[c + 3] * frac_row[e] * frac_col[e];
  }
}

// Backward of add_bias for logit gradients grad_logits (queries x keys): the gradients of the head's
// cell coefficients, and d(loss)/d(in-cell position) summed over queries into grad_key_frac (2 per key).
template <typename scalar_t>
void add_bias_backward(const scalar_t* __restrict__ coefficients, const PairCells<scalar_t>& pairs,
                       const scalar_t* __restrict__ grad_logits, int64_t query_count, int64_t key_count,
                       scalar_t* __restrict__ grad_coefficients, scalar_t* __restrict__ grad_key_frac) {
  for (int64_t i = 0; i < query_count; ++i) {
    const int64_t row = i * key_count;
    const int32_t* __restrict__ cell = pairs.cell.data() + row;
    const scalar_t* __restrict__ frac_row = pairs.frac_row.data() + row;
    const scalar_t* __restrict__ frac_col = pairs.frac_col.data() + row;
    const scalar_t* __restrict__ grad = grad_logits + row;
#pragma omp simd
    for (int64_t j = 0; j < key_count; ++j) {
      const int32_t c = 4 * cell[j];
      grad_key_frac[2 * j] += grad[j] * (coefficients[c + 1] + coefficients[c + 3] * frac_col[j]);
      grad_key_frac[2 * j + 1] += grad[j] * (coefficients[c + 2] + coefficients[c + 3] * frac_row[j]);
    }
    // A scatter: pairs of one query may share a cell, so this loop stays scalar (four adds to one
    // 16-byte coefficient block per pair).
    for (int64_t j = 0; j < key_count; ++j) {
      scalar_t* g = grad_coefficients + 4 * cell[j];
      g[0] += grad[j];
      g[1] += grad[j] * frac_row[j];
      g[2] += grad[j] * frac_col[j];
      g[3] += grad[j] * frac_row[j] * frac_col[j];
    }
  }
}

// Online-softmax step of one row of logits: raises the running max, rescales the row's accumulator,
// turns the logits into unnormalised weights and adds them to the running sum.
template <typename scalar_t>
void online_softmax_row(scalar_t* __restrict__ logits, int64_t count, scalar_t& running_max, scalar_t& running_sum,
                        scalar_t* __restrict__ accumulator, int64_t head_dim) {
  const scalar_t block_max = *std::max_element(logits, logits + count);
  const scalar_t factor = online_softmax_rescale(running_max, running_sum, block_max);
  if (factor != scalar_t(1)) {
    for (int64_t d = 0; d < head_dim; ++d) accumulator[d] *= factor;
  }
  const scalar_t row_max = running_max;
  scalar_t weight_sum = 0;
#pragma omp simd reduction(+ : weight_sum)
  for (int64_t j = 0; j < count; ++j) {
    logits[j] = exp_vectorisable(logits[j] - row_max);
    weight_sum += logits[j];
  }
  running_sum += weight_sum;
}

// `count` rows of head_dim elements as scalar_t: the rows themselves when input_t is scalar_t, else
// converted into `staging`.
template <typename scalar_t, typename input_t>
const scalar_t* rows_as_compute_type(const input_t* rows, int64_t count, int64_t head_dim,
                                     std::vector<scalar_t>& staging) {
  if constexpr (std::is_same_v<scalar_t, input_t>) {
    return rows;
  } else {
    scalar_t* __restrict__ staged = staging.data();
    for (int64_t e = 0; e < count * head_dim; ++e) staged[e] = static_cast<scalar_t>(rows[e]);
    return staged;
  }
}

// One head's q rows of the query tile and k, v rows of the key tile, as scalar_t.
template <typename scalar_t>
struct HeadRows {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
};

template <typename scalar_t, typename input_t>
HeadRows<scalar_t> head_rows(const Operands<scalar_t, input_t>& ops, const WorkItem& item, int64_t head,
                             const Tile& keys, Workspace<scalar_t>& workspace) {
  const int64_t head_dim = ops.geometry.head_dim;
  const int64_t key_offset = ops.key_offset(item.batch, head, keys.begin);
  return {rows_as_compute_type(ops.q + ops.query_offset(item.batch, head, item.queries.begin), item.queries.count,
                               head_dim, workspace.query_rows),
          rows_as_compute_type(ops.k + key_offset, keys.count, head_dim, workspace.key_rows),
          rows_as_compute_type(ops.v + key_offset, keys.count, head_dim, workspace.value_rows)};
}

// Logits scale * Q K^T (+ bias) of one head for the pairs of `pairs`, into workspace.logits.
template <typename scalar_t, typename input_t>
void tile_logits(const Operands<scalar_t, input_t>& ops, const HeadRows<scalar_t>& rows, int64_t head,
                 int64_t query_count, const Tile& keys, Workspace<scalar_t>& workspace) {
  const int64_t head_dim = ops.geometry.head_dim;
  matmul<scalar_t>(rows.q, head_dim, false, rows.k, head_dim, true, workspace.logits.data(), keys.count, query_count,
                   keys.count, head_dim, ops.scale, scalar_t(0));
  if (ops.has_bias()) {
    add_bias(ops.coefficients(head), workspace.pairs, query_count * keys.count, workspace.logits.data());
  }
}

template <typename scalar_t, typename input_t>
void forward_item(const Operands<scalar_t, input_t>& ops, const WorkItem& item, Workspace<scalar_t>& workspace,
                  input_t* out, scalar_t* logsumexp) {
  const Problem& geometry = ops.geometry;
  const int64_t head_dim = geometry.head_dim;
  const int64_t heads_per_group = geometry.heads_per_group();
  const int64_t query_count = item.queries.count;
  std::fill(workspace.accumulators.begin(), workspace.accumulators.end(), scalar_t(0));
  std::fill(workspace.running_max.begin(), workspace.running_max.end(), -std::numeric_limits<scalar_t>::infinity());
  std::fill(workspace.running_sum.begin(), workspace.running_sum.end(), scalar_t(0));

  for (int64_t key_tile = 0; key_tile < ops.key_tiling.count; ++key_tile) {
    const Tile keys = ops.key_tiling.tile(key_tile, geometry.keys);
    if (ops.has_bias()) {
      locate_pairs(ops, item.queries, keys, ops.kpos + ops.kpos_offset(item.batch, item.group, keys.begin),
                   workspace.pairs);
    }
    for (int64_t h = 0; h < heads_per_group; ++h) {
      const int64_t head = item.group * heads_per_group + h;
      const HeadRows<scalar_t> rows = head_rows(ops, item, head, keys, workspace);
      tile_logits(ops, rows, head, query_count, keys, workspace);
      scalar_t* accumulators = workspace.accumulators.data() + h * query_count * head_dim;
      for (int64_t i = 0; i < query_count; ++i) {
        online_softmax_row(workspace.logits.data() + i * keys.count, keys.count,
                           workspace.running_max[h * query_count + i], workspace.running_sum[h * query_count + i],
                           accumulators + i * head_dim, head_dim);
      }
      matmul<scalar_t>(workspace.logits.data(), keys.count, false, rows.v, head_dim, false, accumulators, head_dim,
                       query_count, head_dim, keys.count, scalar_t(1), scalar_t(1));
    }
  }

  for (int64_t h = 0; h < heads_per_group; ++h) {
    const int64_t head = item.group * heads_per_group + h;
    for (int64_t i = 0; i < query_count; ++i) {
      const int64_t row = h * query_count + i;
      const int64_t query_offset = ops.query_offset(item.batch, head, item.queries.begin + i);
      const scalar_t inverse_sum = scalar_t(1) / workspace.running_sum[row];
      for (int64_t d = 0; d < head_dim; ++d) {
        out[query_offset + d] = static_cast<input_t>(workspace.accumulators[row * head_dim + d] * inverse_sum);
      }
      logsumexp[query_offset / head_dim] = workspace.running_max[row] + log_of(workspace.running_sum[row]);
    }
  }
}

template <typename scalar_t, typename input_t>
void backward_item(const Operands<scalar_t, input_t>& ops, const BackwardOperands<scalar_t, input_t>& saved,
                   const WorkItem& item, Workspace<scalar_t>& workspace, const GradientSinks<scalar_t>& sinks,
                   input_t* grad_q) {
  const Problem& geometry = ops.geometry;
  const int64_t head_dim = geometry.head_dim;
  const int64_t heads_per_group = geometry.heads_per_group();
  const int64_t query_count = item.queries.count;
  std::fill(workspace.accumulators.begin(), workspace.accumulators.end(), scalar_t(0));  // grad of q / scale
  for (int64_t h = 0; h < heads_per_group; ++h) {
    const int64_t head = item.group * heads_per_group + h;
    for (int64_t i = 0; i < query_count; ++i) {
      const int64_t offset = ops.query_offset(item.batch, head, item.queries.begin + i);
      scalar_t delta = 0;
      for (int64_t d = 0; d < head_dim; ++d) {
        delta += static_cast<scalar_t>(saved.grad_out[offset + d]) * static_cast<scalar_t>(saved.out[offset + d]);
      }
      workspace.deltas[h * query_count + i] = delta;
    }
  }

  for (int64_t key_tile = 0; key_tile < ops.key_tiling.count; ++key_tile) {
    const Tile keys = ops.key_tiling.tile(key_tile, geometry.keys);
    if (ops.has_bias()) {
      locate_pairs(ops, item.queries, keys, ops.kpos + ops.kpos_offset(item.batch, item.group, keys.begin),
                   workspace.pairs);
      std::fill(workspace.grad_key_frac.begin(), workspace.grad_key_frac.end(), scalar_t(0));
    }
    for (int64_t h = 0; h < heads_per_group; ++h) {
      const int64_t head = item.group * heads_per_group + h;
      const int64_t query_offset = ops.query_offset(item.batch, head, item.queries.begin);
      const int64_t key_offset = ops.key_offset(item.batch, head, keys.begin);
      const HeadRows<scalar_t> rows = head_rows(ops, item, head, keys, workspace);
      const scalar_t* grad_out =
          rows_as_compute_type(saved.grad_out + query_offset, query_count, head_dim, workspace.grad_out_rows);
      tile_logits(ops, rows, head, query_count, keys, workspace);
      scalar_t* probs = workspace.logits.data();
      scalar_t* grad_logits = workspace.grad_logits.data();
      // grad_probs = dO V^T, then turned in place into the logit gradients.
      matmul<scalar_t>(grad_out, head_dim, false, rows.v, head_dim, true, grad_logits, keys.count, query_count,
                       keys.count, head_dim, scalar_t(1), scalar_t(0));
      for (int64_t i = 0; i < query_count; ++i) {
        const scalar_t row_logsumexp = saved.logsumexp[query_offset / head_dim + i];
        const scalar_t row_delta = workspace.deltas[h * query_count + i];
        scalar_t* __restrict__ row_probs = probs + i * keys.count;
        scalar_t* __restrict__ row_grads = grad_logits + i * keys.count;
#pragma omp simd
        for (int64_t j = 0; j < keys.count; ++j) {
          row_probs[j] = exp_vectorisable(row_probs[j] - row_logsumexp);
          row_grads[j] = softmax_logit_grad(row_probs[j], row_grads[j], row_delta);
        }
      }
      matmul<scalar_t>(probs, keys.count, true, grad_out, head_dim, false, sinks.v + key_offset, head_dim, keys.count,
                       head_dim, query_count, scalar_t(1), scalar_t(1));
      matmul<scalar_t>(grad_logits, keys.count, true, rows.q, head_dim, false, sinks.k + key_offset, head_dim,
                       keys.count, head_dim, query_count, ops.scale, scalar_t(1));
      matmul<scalar_t>(grad_logits, keys.count, false, rows.k, head_dim, false,
                       workspace.accumulators.data() + h * query_count * head_dim, head_dim, query_count, head_dim,
                       keys.count, scalar_t(1), scalar_t(1));
      if (ops.has_bias()) {
        add_bias_backward(ops.coefficients(head), workspace.pairs, grad_logits, query_count, keys.count,
                          sinks.coefficients + head * ops.cells.size(), workspace.grad_key_frac.data());
      }
    }
    if (ops.has_bias()) {
      // in-cell position = (query - key) * half * pixels per unit + const, so d/d(key) = -half * that scale
      scalar_t* grad_kpos = sinks.kpos + ops.kpos_offset(item.batch, item.group, keys.begin);
      const scalar_t row_scale = -scalar_t(kDisplacementPerPosition) * pixel_per_unit<scalar_t>(geometry.table_height);
      const scalar_t col_scale = -scalar_t(kDisplacementPerPosition) * pixel_per_unit<scalar_t>(geometry.table_width);
      for (int64_t j = 0; j < keys.count; ++j) {
        grad_kpos[2 * j] += row_scale * workspace.grad_key_frac[2 * j];
        grad_kpos[2 * j + 1] += col_scale * workspace.grad_key_frac[2 * j + 1];
      }
    }
  }

  for (int64_t h = 0; h < heads_per_group; ++h) {
    const int64_t head = item.group * heads_per_group + h;
    const int64_t offset = ops.query_offset(item.batch, head, item.queries.begin);
    const scalar_t* grad_query = workspace.accumulators.data() + h * query_count * head_dim;
    for (int64_t e = 0; e < query_count * head_dim; ++e) {
      grad_q[offset + e] = static_cast<input_t>(grad_query[e] * ops.scale);
    }
  }
}

// Forward of work items [begin, end).
template <typename scalar_t, typename input_t>
void forward_items(const Operands<scalar_t, input_t>& ops, int64_t begin, int64_t end, input_t* out,
                   scalar_t* logsumexp) {
  Workspace<scalar_t> workspace(ops);
  for (int64_t index = begin; index < end; ++index) {
    forward_item(ops, ops.work_item(index), workspace, out, logsumexp);
  }
}

// Backward of work items [begin, end); key-side gradients go to `sinks`.
template <typename scalar_t, typename input_t>
void backward_items(const Operands<scalar_t, input_t>& ops, const BackwardOperands<scalar_t, input_t>& saved,
                    int64_t begin, int64_t end, const GradientSinks<scalar_t>& sinks, input_t* grad_q) {
  Workspace<scalar_t> workspace(ops);
  for (int64_t index = begin; index < end; ++index) {
    backward_item(ops, saved, ops.work_item(index), workspace, sinks, grad_q);
  }
}
