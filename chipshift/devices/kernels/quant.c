/* Weight-only quantized linears (GGUF Q8_0, Q4_0, Q4_1 blocks): see quant.py. */
#include "bf16.h"
