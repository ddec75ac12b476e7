# What a TableCore is built from (included by table.pyx after the optimizer and admission
# enums): every number by name, converted to its C type once, when the parameters are made.


cdef class TableParams:
    """Parameters of one table shard's core, by name (keyword-only; read-only once made).

    Shape:
        dim: row width (values per row); capacity: rows allocated up front, in
        [1, 2^31 - 1] (the store grows past it); row_dtype: how rows are stored, 0 float32,
        1 fp16, 2 bf16 (table_half.h's HT_F32, HT_F16, HT_BF16).
    Optimizer (the fused update of ``TableCore.apply``):
        opt_kind: code of the optimizer (table_optim.pxi's enum, the order of
        ``hpctrain.sparse.optimizers.KINDS``); lr, momentum, beta1, beta2, eps, l1, l2,
        lr_power, weight_decay: its hyper-parameters (those it does not use are ignored);
        slot0_width, slot1_width: floats per row of its two state slots (the layout's
        ``w0``, ``w1``; 0: no slot); slot0_init, slot1_init: their initial value;
        has_opt_step: keep a per-row update count (Adam's bias correction).
    Initial rows (table_init.pxi's formula):
        seed, table_id: 64-bit patterns; init_normal: normal (std ``init_scale``) instead
        of uniform in [-init_scale, init_scale).
    Admission (table_admit.pxi):
        min_count: occurrences before a key gets a row (<= 1: every key at once);
        adm_kind: 1 exact counters, 2 counting Bloom filter of ``bloom_size`` 8-bit
        counters and ``bloom_hashes`` hashes.

    Raises:
        ValueError: on sizes or codes no core can be built from.
    """
    cdef readonly int64_t dim
    cdef readonly int64_t capacity
    cdef readonly int row_dtype
    cdef readonly int opt_kind
    cdef readonly double lr, momentum, beta1, beta2, eps, l1, l2, lr_power, weight_decay
    cdef readonly int64_t slot0_width, slot1_width
    cdef readonly float slot0_init, slot1_init
    cdef readonly bint has_opt_step
    cdef readonly uint64_t seed, table_id
    cdef readonly bint init_normal
    cdef readonly double init_scale
    cdef readonly int64_t min_count
    cdef readonly int adm_kind
    cdef readonly int64_t bloom_size
    cdef readonly int bloom_hashes

    def __init__(self, *, int64_t dim, int64_t capacity, int opt_kind, double lr,
                 double momentum=0.0, double beta1=0.0, double beta2=0.0, double eps=0.0,
                 double l1=0.0, double l2=0.0, double lr_power=0.0, double weight_decay=0.0,
                 int64_t slot0_width=0, int64_t slot1_width=0, float slot0_init=0.0,
                 float slot1_init=0.0, bint has_opt_step=False, uint64_t seed=0,
                 uint64_t table_id=0, bint init_normal=False, double init_scale,
                 int64_t min_count=0, int adm_kind=ADM_NONE, int64_t bloom_size=0,
                 int bloom_hashes=0, int row_dtype=0):
        self.dim, self.capacity, self.opt_kind, self.lr = dim, capacity, opt_kind, lr
        self.row_dtype = row_dtype
        self.momentum, self.beta1, self.beta2, self.eps = momentum, beta1, beta2, eps
        self.l1, self.l2, self.lr_power, self.weight_decay = l1, l2, lr_power, weight_decay
        self.slot0_width, self.slot1_width = slot0_width, slot1_width
        self.slot0_init, self.slot1_init = slot0_init, slot1_init
        self.has_opt_step = has_opt_step
        self.seed, self.table_id = seed, table_id
        self.init_normal, self.init_scale = init_normal, init_scale
        self.min_count, self.adm_kind = min_count, adm_kind
        self.bloom_size, self.bloom_hashes = bloom_size, bloom_hashes
        self.check()

    cdef int check(self) except -1:
        # also run by TableCore: TableParams.__new__ skips __init__
        if (self.dim < 1 or self.slot0_width < 0 or self.slot1_width < 0
                or self.capacity < 1 or self.capacity > MAX_ROWS):
            raise ValueError(f"TableParams: bad sizes dim={self.dim} "
                             f"slot widths={self.slot0_width},{self.slot1_width} "
                             f"capacity={self.capacity}")
        if not (OPT_SGD <= self.opt_kind <= OPT_FTRL and ADM_NONE <= self.adm_kind <= ADM_BLOOM):
            raise ValueError(f"TableParams: bad optimizer {self.opt_kind} or admission "
                             f"{self.adm_kind} code")
        if not HT_F32 <= self.row_dtype <= HT_BF16:
            raise ValueError(f"TableParams: bad row dtype code {self.row_dtype} (0 float32, "
                             f"1 fp16, 2 bf16)")
        if self.min_count > 1 and self.adm_kind == ADM_BLOOM \
                and (self.bloom_size < 1 or self.bloom_hashes < 1):
            raise ValueError(f"bad Bloom filter size {self.bloom_size} / hashes "
                             f"{self.bloom_hashes}")
        return 0

    def as_dict(self):
        """The parameters as a dict (the keywords that rebuild them)."""
        return {name: getattr(self, name) for name in _PARAM_NAMES}

    def __repr__(self):
        return "TableParams(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


_PARAM_NAMES = ("dim", "capacity", "opt_kind", "lr", "momentum", "beta1", "beta2", "eps", "l1",
                "l2", "lr_power", "weight_decay", "slot0_width", "slot1_width", "slot0_init",
                "slot1_init", "has_opt_step", "seed", "table_id", "init_normal", "init_scale",
                "min_count", "adm_kind", "bloom_size", "bloom_hashes", "row_dtype")
