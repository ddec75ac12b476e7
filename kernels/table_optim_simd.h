/* The vector Adagrad and Adam updates of table_optim.h, written once: table_optim.h
   includes this file once per instruction set, with HT_TARGET (the function attribute),
   HT_NAME (the variant's name), HT_VD (doubles per vector) and the ht_* vector operations
   defined. No include guard on purpose. */

HT_TARGET static void HT_NAME(ht_adagrad)(float* w, float* a, const float* g, int64_t d,
                                          double lr, double eps, double wd) {
    int64_t j = 0;
    const ht_vd vlr = ht_set1(lr), veps = ht_set1(eps), vwd = ht_set1(wd);
    for (; j + HT_VD <= d; j += HT_VD) {
        ht_vd wj = ht_load(w + j);
        ht_vd gj = ht_add(ht_load(g + j), ht_mul(vwd, wj));
        ht_vd aj = ht_add(ht_load(a + j), ht_mul(gj, gj));
        ht_store(a + j, aj);
        ht_store(w + j, ht_sub(wj, ht_div(ht_mul(vlr, gj), ht_add(ht_sqrt(aj), veps))));
    }
    ht_adagrad_tail(w, a, g, j, d, lr, eps, wd);
}

HT_TARGET static void HT_NAME(ht_adam)(float* w, float* m, float* v, const float* g,
                                       int64_t d, double lr, double b1, double b2, double eps,
                                       double wd, double bc1, double bc2) {
    int64_t j = 0;
    const ht_vd vlr = ht_set1(lr), veps = ht_set1(eps), vwd = ht_set1(wd);
    const ht_vd vb1 = ht_set1(b1), vc1 = ht_set1(1.0 - b1), vb2 = ht_set1(b2);
    const ht_vd vc2 = ht_set1(1.0 - b2), vbc1 = ht_set1(bc1), vbc2 = ht_set1(bc2);
    for (; j + HT_VD <= d; j += HT_VD) {
        ht_vd wj = ht_load(w + j);
        ht_vd gj = ht_add(ht_load(g + j), ht_mul(vwd, wj));
        ht_vd mj = ht_add(ht_mul(vb1, ht_load(m + j)), ht_mul(vc1, gj));
        ht_vd vj = ht_add(ht_mul(vb2, ht_load(v + j)), ht_mul(ht_mul(vc2, gj), gj));
        ht_store(m + j, mj);
        ht_store(v + j, vj);
        ht_vd num = ht_mul(vlr, ht_div(mj, vbc1));
        ht_store(w + j, ht_sub(wj, ht_div(num, ht_add(ht_sqrt(ht_div(vj, vbc2)), veps))));
    }
    ht_adam_tail(w, m, v, g, j, d, lr, b1, b2, eps, wd, bc1, bc2);
}
