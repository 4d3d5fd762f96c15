"""The CPU-shaped attention and dense product against textbook formulas in float64 numpy.

``models/vit.py`` writes both for XLA's CPU backend (split q/k/v, scale on q, softmax normalised
after the product with v; the kernel gradient from an explicit ``x^T``). They must stay the same
functions, values and gradients, as the plain formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsvfm_jax.models.vit import Attention, dense_product, dense_products_for


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _attention_reference(x, params, heads):
    """timm 0.4.5's attention: packed qkv, softmax((q k^T) * scale) v, proj; float64."""
    b, n, d = x.shape
    hd = d // heads
    qkv = x @ params["qkv"]["kernel"] + params["qkv"]["bias"]
    qkv = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    weights = _softmax(q @ k.transpose(0, 1, 3, 2) * hd**-0.5)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return out @ params["proj"]["kernel"] + params["proj"]["bias"]


@pytest.mark.parametrize("batch,tokens,width,heads", [(2, 50, 48, 4), (3, 17, 64, 8)])
def test_attention_matches_the_textbook_formula(batch, tokens, width, heads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, tokens, width)).astype(np.float32)
    module = Attention(heads)
    params = module.init(jax.random.key(0), x)
    # large logits (x3) so a missing max-subtraction or a wrong normalisation shows
    params = jax.tree.map(lambda p: p * 3.0, params)
    got = np.asarray(jax.jit(module.apply)(params, x))
    p64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params["params"])
    want = _attention_reference(x.astype(np.float64), p64, heads)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_attention_gradient_matches_finite_differences_of_the_reference():
    """d loss / d x for loss = sum(attention(x) * c): central differences of the float64 reference
    against the jitted float32 gradient."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 9, 16)).astype(np.float32)
    c = rng.standard_normal((2, 9, 16))
    module = Attention(4)
    params = jax.tree.map(lambda p: p * 2.0, module.init(jax.random.key(1), x))
    p64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params["params"])
    grad = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(module.apply(params, x) * c)))(x))
    x64, eps = x.astype(np.float64), 1e-6
    numeric = np.zeros_like(x64)
    for idx in np.ndindex(x64.shape):
        plus, minus = x64.copy(), x64.copy()
        plus[idx] += eps
        minus[idx] -= eps
        change = _attention_reference(plus, p64, 4) - _attention_reference(minus, p64, 4)
        numeric[idx] = np.sum(change * c) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_dense_product_value_and_gradients_match_numpy():
    """On CPU the kernel gradient comes from a custom rule (explicit x^T); it must equal x^T g and
    the input gradient g W^T, for token-major 3-D inputs as the blocks pass them."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 7, 5)).astype(np.float32)
    kernel = rng.standard_normal((5, 6)).astype(np.float32)
    g = rng.standard_normal((3, 7, 6)).astype(np.float32)
    value, vjp = jax.vjp(dense_product, x, kernel)
    grad_x, grad_kernel = jax.jit(vjp)(g)
    x64, k64, g64 = (a.astype(np.float64) for a in (x, kernel, g))
    np.testing.assert_allclose(value, x64 @ k64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_x, g64 @ k64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_kernel, x64.reshape(-1, 5).T @ g64.reshape(-1, 6), rtol=1e-5, atol=1e-5)


def test_dense_product_form_follows_the_platform_it_is_traced_for():
    """The explicit-transpose gradient is a CPU form: traced for another platform (a TPU topology
    compiled from this host) the gradient is the plain product, with no barrier, same numbers."""
    rng = np.random.default_rng(3)
    x, kernel, g = (rng.standard_normal(s).astype(np.float32) for s in ((4, 5), (5, 6), (4, 6)))

    def grads():
        return jax.make_jaxpr(lambda x, k: jax.vjp(dense_product, x, k)[1](g))(x, kernel)

    assert "optimization_barrier" in str(grads())  # this host's default backend is CPU
    with dense_products_for("tpu"):
        assert "optimization_barrier" not in str(grads())
        plain = jax.vjp(dense_product, x, kernel)[1](g)
    assert "optimization_barrier" in str(grads())  # the context ends with the block
    for got, want in zip(plain, jax.vjp(dense_product, x, kernel)[1](g)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
