# The W8A8 op library (kernels/*.cu, issue 19): built for sm_90 (Hopper: cuBLASLt's per-row FP8 GEMM) and sm_100
# / sm_120 (the quantization kernel; cuBLASLt decides whether it has a GEMM there), with nvcc 13 against the
# headers kernels/fetch_headers.sh fetches into build/kernels/include. Included by the Makefile; `make test`
# builds it so a compile error fails CI.
NVCC ?= nvcc
W8A8_LIB := build/kernels/libideogram4_w8a8.so
W8A8_SRC := kernels/fp8_quant.cu kernels/fp8_gemm.cu kernels/w8a8_ops.cu kernels/w8a8_register.cu
W8A8_HDR := kernels/fp8_quant.cuh kernels/w8a8.h
KERNEL_INCLUDE := build/kernels/include
KERNEL_ARCH ?= -gencode arch=compute_90,code=sm_90 -gencode arch=compute_100,code=sm_100 \
	-gencode arch=compute_120,code=sm_120

$(KERNEL_INCLUDE)/.fetched: kernels/fetch_headers.sh
	PIP="$(abspath $(BIN))/pip" bash kernels/fetch_headers.sh $(KERNEL_INCLUDE)
	touch $@

$(W8A8_LIB): $(W8A8_SRC) $(W8A8_HDR) kernels/w8a8.mk $(KERNEL_INCLUDE)/.fetched | $(BIN)/.installed
	@mkdir -p $(dir $@)
	$(NVCC) -std=c++17 -O3 -shared -Xcompiler -fPIC,-fvisibility=hidden -Xcompiler -Wall \
		-I$(KERNEL_INCLUDE)/ort -I$(KERNEL_INCLUDE)/cublas $(KERNEL_ARCH) $(W8A8_SRC) -ldl -o $@.tmp
	mv $@.tmp $@

w8a8-lib: $(W8A8_LIB)
.PHONY: w8a8-lib
