from tests.wrong_solutions import wrong


@wrong("14.1", "2 FLOPs (a multiply and an add)")
def matmul_one_flop(m, k, n, eb):
    return m * k * n, eb * (m * k + k * n + m * n)


@wrong("14.1", "the result C (m×n) must be written")
def matmul_no_write(m, k, n, eb):
    return 2 * m * k * n, eb * (m * k + k * n)


@wrong("14.1", "that counts elements")
def matmul_elements(m, k, n, eb):
    return 2 * m * k * n, m * k + k * n + m * n


@wrong("14.1", "reads each operand once")
def matmul_reread_b(m, k, n, eb):
    return 2 * m * k * n, eb * (m * k + m * k * n + m * n)  # B read once per row of A


@wrong("14.1", "yours is swapped")
def matmul_swapped(m, k, n, eb):
    return eb * (m * k + k * n + m * n), 2 * m * k * n


def _block(b, s, d, h, kvh, r, scores=True, mask=True, rope=True, kv_dim=None, elem=4):
    hd = d // h
    kv = kv_dim if kv_dim is not None else kvh * hd
    values = (8 + 2 * r) * b * s * d + 2 * b * s * kv + 2 * b * s + (2 * s * hd if rope else 0)
    values += b * h * s * s if scores else 0
    return elem * values + (s * s if mask else 0)


@wrong("14.2", "the softmax output (b·heads·s² scores)")
def block_no_scores(b, s, d, h, kvh, r):
    return _block(b, s, d, h, kvh, r, scores=False, mask=False)  # "flash attention keeps no scores"


@wrong("14.2", "the s×s boolean causal mask")
def block_no_mask(b, s, d, h, kvh, r):
    return _block(b, s, d, h, kvh, r, mask=False)


@wrong("14.2", "RoPE's cos and sin tables")
def block_no_rope(b, s, d, h, kvh, r):
    return _block(b, s, d, h, kvh, r, rope=False)


@wrong("14.2", "b·s·(mlp_ratio·dim)")
def block_mlp_width_dim(b, s, d, h, kvh, r):
    return _block(b, s, d, h, kvh, r) - 4 * 2 * (r - 1) * b * s * d


@wrong("14.2", "n_kv_heads·head_dim channels")
def block_kv_full_width(b, s, d, h, kvh, r):
    return _block(b, s, d, h, kvh, r, kv_dim=d)


@wrong("14.2", "multiply by 4 bytes")
def block_values(b, s, d, h, kvh, r):
    return _block(b, s, d, h, kvh, r, mask=False, elem=1) + s * s


def _adapters(hidden, inter, heads, kvh, layers, r, targets, kv_full=False, dense=False):
    hd = hidden // heads
    kv = hidden if kv_full else kvh * hd
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    return layers * sum(a * b if dense else r * (a + b) for a, b in (shapes[t] for t in targets))


def _steps(layers, targets):
    return 4 * 2 * len(targets) * layers


@wrong("14.3", "a step count per parameter tensor")
def adam_no_step(hidden, inter, heads, kvh, layers, r, targets, pb):
    return 2 * pb * _adapters(hidden, inter, heads, kvh, layers, r, targets)


@wrong("14.3", "two moments per parameter")
def adam_one_moment(hidden, inter, heads, kvh, layers, r, targets, pb):
    return pb * _adapters(hidden, inter, heads, kvh, layers, r, targets) + _steps(layers, targets)


@wrong("14.3", "in the parameter's dtype")
def adam_fp32_moments(hidden, inter, heads, kvh, layers, r, targets, pb):
    return 2 * 4 * _adapters(hidden, inter, heads, kvh, layers, r, targets) + _steps(layers, targets)


@wrong("14.3", "kv_heads·head_dim outputs")
def adam_kv_full_width(hidden, inter, heads, kvh, layers, r, targets, pb):
    return 2 * pb * _adapters(hidden, inter, heads, kvh, layers, r, targets, kv_full=True) + _steps(layers, targets)


@wrong("14.3", "r·(in+out)")
def adam_dense_adapters(hidden, inter, heads, kvh, layers, r, targets, pb):
    return 2 * pb * _adapters(hidden, inter, heads, kvh, layers, r, targets, dense=True) + _steps(layers, targets)


@wrong("14.3", "has its own adapters")
def adam_one_layer(hidden, inter, heads, kvh, layers, r, targets, pb):
    return 2 * pb * _adapters(hidden, inter, heads, kvh, 1, r, targets) + _steps(1, targets)
