"""The profile's kernel classes (maskar bench train_step profile=): Inductor kernels are matched by
whole op tokens, so a fused kernel is filed by what it computes."""

from maskar.bench.train_step import categorize


def test_inductor_kernels_are_filed_by_op_tokens():
    # The q/k L2-norm backward of every block (exp of the gain, clamp_min/div of normalize): not CE.
    qk = (
        "triton_poi_fused__to_copy_add_clamp_clamp_min_div_eq_exp_expand_ge_masked_fill_mul_scalar_tensor_"
        "stack_where_14"
    )
    assert categorize(qk) == "other elementwise"
    ce = (
        "triton_red_fused__to_copy_add_exp_gather_logsumexp_mean_mul_scatter_add_squeeze_sub_sum_"
        "unsqueeze_1"
    )
    assert categorize(ce) == "cross-entropy"
    ln = (
        "triton_red_fused__to_copy_add_addcmul_div_mul_native_layer_norm_native_layer_norm_backward_"
        "rsub_view_8"
    )
    assert categorize(ln) == "norms"
    assert categorize("triton_per_fused_linalg_vector_norm_permute_unbind_view_11") == "norms"


def test_library_kernels_are_filed_by_name():
    assert categorize("nvjet_sm90_tst_128x192_64x5_2x1_v_bz_coopB_NNN") == "matmul"
    assert categorize("_attn_bwd") == "attention"
    for k in ("_qk_norm_fwd", "_qk_norm_bwd", "_qk_norm_gain_grad"):  # maskar.kernels.qk_norm
        assert categorize(k) == "norms"
    adam = "void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>"
    assert categorize(adam) == "optimizer"
    assert categorize("void at::native::upsample_bicubic2d_out_frame<float, float>") == "other elementwise"
