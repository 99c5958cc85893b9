# The Yadage workflow (see the README's "Yadage workflow" section).
#   make yadage-run                                    local processes, the toy, methods alices and sally
#   make yadage-run DATA=/path/events.h5 METHODS=alice,alices,sally OVERRIDES="+experiment=seed_workflow"
#   make image                                         the step image from workflow/Dockerfile
#   make image-offline                                 the same without any registry (debootstrap + wheelhouse)
#   make yadage-run-docker                             the workflow with every step in the image
#   make yadage-validate                               packtivity-validate every step, yadage-validate the workflow
#   make reana-spec IMAGE=REGISTRY/NAME:TAG            the docker-encapsulated workflow for workflow/reana.yaml

PYTHON    ?= python
DATA      ?= toy
METHODS   ?= alices,sally
OVERRIDES ?=
WORKDIR   ?=
IMAGE     ?= madminer-sweeper:latest
BASE      ?= python:3.11-slim
# image-offline: a Debian bookworm base made with debootstrap from the configured Debian mirror
DEBIAN_MIRROR ?= $(shell sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
OFFLINE_BASE  ?= madminer-sweeper-base:bookworm
TORCH         ?= torch==2.13.0

RUN_ARGS = --data "$(DATA)" --methods "$(METHODS)" $(if $(WORKDIR),--workdir "$(WORKDIR)")
STEPS    = setup sampling training evaluating comparing

.PHONY: yadage-run yadage-run-docker yadage-validate image image-offline base-image-offline wheelhouse image-context \
	reana-spec reana-validate

yadage-run:
	$(PYTHON) -m app.workflow run $(RUN_ARGS) $(OVERRIDES)

yadage-run-docker:
	$(PYTHON) -m app.workflow run --docker --image "$(IMAGE)" $(RUN_ARGS) $(OVERRIDES)

yadage-validate:
	@for step in $(STEPS); do packtivity-validate -t workflow/yadage "steps.yml#/$$step" || exit 1; done
	yadage-validate -t workflow/yadage workflow.yml

# The build context holds only what the image needs: no host configuration or credentials.
image-context:
	rm -rf build/image && mkdir -p build/image
	cp -r pyproject.toml README.md conf src build/image/
	find build/image -name __pycache__ -prune -exec rm -rf {} +
	cp workflow/Dockerfile build/image/Dockerfile

image: image-context
	docker build --network host --build-arg BASE=$(BASE) -t $(IMAGE) build/image

# The project's wheel and those of all its dependencies (CPU torch included), made on the host;
# remade when pyproject.toml or src/ change.
wheelhouse: build/wheelhouse/.complete
build/wheelhouse/.complete: pyproject.toml $(shell find src conf -type f -not -path '*/__pycache__/*')
	rm -f build/wheelhouse/madminer_sweeper-*.whl
	$(PYTHON) -m pip wheel --wheel-dir build/wheelhouse . "$(TORCH)"
	touch $@

base-image-offline:
	@test -n "$(DEBIAN_MIRROR)" || { echo "error: no Debian mirror found; set DEBIAN_MIRROR=..." >&2; exit 2; }
	rm -rf build/rootfs
	debootstrap --variant=minbase --include=python3,python3-venv bookworm $(CURDIR)/build/rootfs $(DEBIAN_MIRROR)
	rm -rf build/rootfs/var/cache/apt/archives/*.deb build/rootfs/var/lib/apt/lists/*
	tar -C build/rootfs -c . | docker import - $(OFFLINE_BASE)
	rm -rf build/rootfs

image-offline: wheelhouse image-context
	@docker image inspect $(OFFLINE_BASE) >/dev/null 2>&1 || $(MAKE) base-image-offline
	port=$$($(PYTHON) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	$(PYTHON) -m http.server "$$port" --bind 127.0.0.1 --directory build/wheelhouse >/dev/null 2>&1 & server=$$!; \
	trap 'kill $$server' EXIT; \
	for _ in $$(seq 50); do $(PYTHON) -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$$port/')" 2>/dev/null && break; sleep 0.1; done; \
	docker build --network host --build-arg BASE=$(OFFLINE_BASE) --build-arg WHEELS=http://127.0.0.1:$$port/ -t $(IMAGE) build/image

# REANA runs every step in a container: the resolved workflow with every step docker-encapsulated in IMAGE.
reana-spec:
	mkdir -p build/reana
	$(PYTHON) -m app.workflow spec --docker --image "$(IMAGE)" -o build/reana/workflow.json

reana-validate: reana-spec
	reana-client validate -f workflow/reana.yaml
