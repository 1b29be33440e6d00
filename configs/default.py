"""Default configuration: every key chartx reads, with a comment on each.

The other configs start from this one and change what they need. It is the paper's
T12 model (Al-Rfou et al., 2019) on enwik8, as a base to override:

    python -m chartx.main --config=configs/default.py --workdir=/tmp/chartx_default \
        --config.data.name=text_files --config.data.path=README.md

Hardware: anything; the numbers to expect depend on the overrides.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameters, dropout and the training batches.

  config.data = ml_collections.ConfigDict()
  config.data.name = "enwik8"  # "enwik8" | "text8" | "text_files".
  config.data.path = ""  # text_files: a file, a directory or a glob; enwik8/text8: the zip if not in manual_dir.
  config.data.data_dir = ""  # TFDS data_dir for the prepared enwik8/text8; "" uses TFDS's default.
  config.data.valid_path = ""  # text_files: optional separate validation file (else a 90/5/5 split).
  config.data.test_path = ""  # text_files: optional separate test file.
  config.data.seq_len = 512  # Characters of context per training window (the paper: 512).

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 12  # Transformer layers (T12: 12, T64: 64).
  config.model.d_model = 512  # Width of the residual stream.
  config.model.num_heads = 8  # Attention heads; d_model must divide by it.
  config.model.d_ff = 2048  # Hidden width of the feed-forward block.
  # Rows of the fixed family's positional tables; data.seq_len must not exceed it (rope and XL: unused).
  config.model.max_len = 512
  config.model.dropout = 0.55  # Residual and embedding dropout (as reimplementations report).
  # Positions: "per_layer" (a learned table added to every layer's input, the paper) | "input" (one
  # learned table added to the embeddings) | "sinusoid" (Vaswani et al.'s fixed timing signal at the input)
  # | "rope" (rotary: every layer's queries and keys rotated by their position).
  config.model.positions = "per_layer"
  config.model.tie_embeddings = False  # Next-character classifiers reuse the input embedding (fewer params).
  config.model.scan_layers = True  # nn.scan over layers: compile time independent of depth.
  config.model.remat = "none"  # Rematerialization per layer: "none" | "full" | "dots" (save matmul outputs).
  # Compute dtype: "float32" | "bfloat16" (parameters and softmaxes stay float32) | "auto":
  # bfloat16 on a GPU or TPU, float32 on a CPU.
  config.model.dtype = "auto"
  # Attention kernel: "xla" (blockwise, any backend) | "cudnn" (GPU flash attention, 16-bit) |
  # "splash" (TPU Pallas kernel) | "auto": cudnn on a GPU in bfloat16, splash on a TPU, else xla.
  config.model.attention = "auto"
  config.model.activation = "relu"  # Feed-forward nonlinearity: "relu" (the paper) | "gelu" (GPT-2).
  # Projection initialization: "lecun" (variance 1/fan_in; embeddings N(0, 1)) | "gpt2" (N(0, 0.02),
  # residual output projections divided by sqrt(2 x layers), embeddings N(0, 0.02)).
  config.model.init = "lecun"
  # Model family: "fixed" (Al-Rfou et al.: fixed context, learned positions) | "xl" (Transformer-XL,
  # Dai et al. 2019: segment recurrence with a memory, relative positions; chartx/families/xl.py).
  config.model.family = "fixed"
  config.model.mem_len = 0  # xl: memory rows kept per layer in training (the previous segments' states).
  config.model.clamp_len = 0  # xl: relative distances above it use its encoding; 0: no clamp.
  config.model.same_length = False  # xl: every query sees mem_len + 1 keys (itself and mem_len before it).

  config.loss = ml_collections.ConfigDict()
  config.loss.multiple_positions = True  # Aux 1: next-char loss at every position (False: last position only).
  config.loss.intermediate_layers = True  # Aux 2: every layer l < n predicts too, until step l/(2n) * num_steps.
  config.loss.multiple_targets = 2  # Aux 3: predict 1..k characters ahead at each position; 1 turns it off.
  config.loss.aux_target_weight = 0.5  # Weight of each extra (k >= 2) target's loss (the paper: 0.5).
  # Training targets keep 1 - this of their mass and spread the rest over the vocabulary; the
  # reported loss and bpc stay the plain likelihood. 0: off (the paper).
  config.loss.label_smoothing = 0.0
  # How the active layers' losses combine: "sum" (each layer's loss at full weight, so the total
  # grows with depth) | "mean" (the sum divided by the number of layers whose loss is on).
  config.loss.layer_reduction = "sum"

  config.optimizer = ml_collections.ConfigDict()
  # The paper's configs keep its published optimizer (momentum 0.99, fixed lr 0.003, no warm-up, no
  # clipping). At CPU scale it stalls, and neither warm-up, clipping, averaged layer losses nor
  # larger rates made it train (docs/results.md, "The paper's optimizer at small scale"), so none
  # of them is added here; the small configs use Adam instead.
  config.optimizer.name = "momentum"  # "momentum" (SGD with momentum, the paper) | "adamw".
  config.optimizer.learning_rate = 0.003  # Peak learning rate (the paper: fixed 0.003).
  config.optimizer.momentum = 0.99  # Momentum (the paper: 0.99); adamw's b1.
  config.optimizer.b2 = 0.999  # adamw's second-moment decay (nanoGPT: 0.99).
  config.optimizer.nesterov = False  # Nesterov momentum.
  config.optimizer.schedule = "constant"  # "constant" | "rsqrt" (inverse square root) | "cosine".
  config.optimizer.warmup_steps = 0  # Linear warm-up from 0 before the schedule.
  config.optimizer.grad_clip = 0.0  # Clip the global gradient norm to this; 0 turns clipping off.
  config.optimizer.weight_decay = 0.0  # Decoupled weight decay of the matrices (adamw only).

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # Global batch of windows per step (the paper: 16).
  config.train.num_steps = 2_500_000  # Steps to train; also the horizon of the intermediate-layer schedule.
  config.train.log_every = 100  # Steps between metric lines in metrics.jsonl and TensorBoard.
  config.train.eval_every = 10_000  # Steps between validation runs (strided, eval.max_chars); 0 turns them off.
  # Steps between checkpoints (also saved: the last step, an eval step with a new best validation
  # bpc, and the step a SIGTERM/SIGINT stops at); 0 turns all of them off.
  config.train.checkpoint_every = 10_000
  config.train.keep_checkpoints = 3  # Newest checkpoints kept on disk (0: all), plus the best by validation bpc.
  # Micro-batches per update: the batch is split into this many equal parts, whose gradients are
  # averaged before one optimizer update (the paper's 16 x 512 batch on a small GPU). Steps, the
  # learning rate and the aux-loss schedule count updates. Must divide batch_size.
  config.train.grad_accum_steps = 1
  # A JAX profiler trace of steps START..STOP-1 ("START,STOP") into WORKDIR/plugins/profile, for
  # TensorBoard's profile plugin; "" traces nothing.
  config.train.profile_steps = ""

  config.checkpoint = ml_collections.ConfigDict()
  # Resume from the newest readable checkpoint in WORKDIR/checkpoints. False starts at step 0 and
  # renames existing checkpoints to WORKDIR/checkpoints.replaced-<time> (never deletes them); keep
  # it True on preemptible machines, where a restart with False would start over every time.
  config.checkpoint.resume = True
  # Fine-tuning: a workdir whose newest checkpoint gives this run its first parameters (step 0,
  # fresh optimizer state; the model shapes must match). Used only while WORKDIR has no checkpoint.
  config.checkpoint.init_from = ""

  config.mesh = ml_collections.ConfigDict()
  # Devices along (data, fsdp, tensor), over all processes; one -1 takes the rest. data: plain
  # data parallelism (every device holds all parameters); fsdp: data parallelism with parameters
  # and optimizer state split over it; tensor: heads, feed-forward units and vocabulary split.
  # (-1, 1, 1) fits a laptop or one GPU host; (-1, 8, 1) shards the state 8 ways on a pod, e.g.
  # --config.mesh.shape="(-1,8,1)". train.batch_size and eval.batch_size: multiples of data x fsdp.
  config.mesh.shape = (-1, 1, 1)
  # CPU-only hosts: XLA CPU devices to split the cores into (the data axis then spans them; see
  # chartx/cpu_devices.py). 0: one per usable core, as many as divide the batch sizes.
  config.mesh.cpu_devices = 0
  # Logical axis name -> mesh axes (None: not split). Parameters: vocab, embed, heads, head_dim,
  # mlp, length (positions), layers (the scanned stack's leading axis), targets; activations:
  # batch, length, embed, mlp. For each array the rules apply in order and a mesh axis is used
  # once: activations' batch takes fsdp first, so their embed stays whole, while parameters'
  # embed (no batch axis) is split over fsdp. A dimension its mesh axes do not divide (text8's
  # 27 symbols over tensor=2) stays whole, with a warning.
  config.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("head_dim", None),
      ("length", None),
      ("layers", None),
      ("targets", None),
  )

  config.log = ml_collections.ConfigDict()
  # Weights & Biases project to log training to as well (pip install 'chartx[wandb]'); "" is off.
  config.log.wandb_project = ""
  config.log.wandb_entity = ""  # W&B team or user owning the project; "" is W&B's default one.

  config.eval = ml_collections.ConfigDict()
  config.eval.split = "validation"  # "validation" | "test".
  # The fixed family's sliding window: characters scored per window of data.seq_len; 1 is the
  # paper's protocol, 0 means data.seq_len (each window scores all of its characters). Must be 0
  # for Transformer-XL, which evaluates recurrently (eval.seq_len, eval.mem_len).
  config.eval.stride = 0
  config.eval.max_chars = 0  # Evaluate only this prefix of the split; 0 means the whole split.
  config.eval.batch_size = 16  # Windows per eval batch (global); Transformer-XL: the contiguous streams.
  # Transformer-XL's recurrent evaluation (model.family=xl only; the defaults mean "as in training"):
  config.eval.seq_len = 0  # Characters per segment, each scored whole; 0: data.seq_len.
  config.eval.mem_len = -1  # Positions of memory each segment sees; -1: model.mem_len.
  config.eval.clamp_len = -1  # Relative distances above it share its encoding (0: none); -1: model.clamp_len.
  # Every character sees eval.mem_len + 1 characters (else up to eval.mem_len + eval.seq_len):
  # "true" | "false" | "auto": as model.same_length.
  config.eval.same_length = "auto"
  config.eval.step = -1  # Checkpoint step for --mode=eval/sample; -1 means the newest.
  config.eval.best = False  # --mode=eval/sample: the checkpoint with the lowest validation bpc instead.

  config.compile = ml_collections.ConfigDict()
  # --mode=compile (docs/tpu.md): compile the train and eval steps ahead of time for this TPU slice
  # (pip install 'chartx[tpu]'; no TPU needed), as jax.experimental.topologies names it:
  # VERSION:AxB or AxBxC in chips, e.g. "v4:2x2x1" (a v4-8), "v5e:2x4" (v5e-8), "v5p:4x4x4".
  config.compile.topology = ""
  config.compile.num_slices = 1  # Slices of that topology (multi-slice: the data axis spans them).
  config.compile.max_batch = False  # Also search the largest global train.batch_size that fits (compiles ~log2 times more).
  config.compile.output = ""  # The JSON result's path; "" is WORKDIR/compile_<topology>.json.

  config.sample = ml_collections.ConfigDict()
  config.sample.prompt = "The "  # Text the sample continues.
  config.sample.num_chars = 200  # Characters to generate.
  config.sample.temperature = 1.0  # Softmax temperature; 0 means greedy.
  config.sample.top_k = 0  # Keep the k most likely characters; 0 keeps all.
  config.sample.top_p = 1.0  # Nucleus sampling: keep the smallest set with this much mass; 1 keeps all.
  config.sample.seed = 0  # Seed of the sampler.
  # Beam search: keep this many most likely continuations and return the best (temperature, top_k
  # and top_p left at their defaults); 1 samples as above.
  config.sample.beam_size = 1
  return config
