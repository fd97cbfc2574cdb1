// The CPU kernels for the architecture's baseline (x86-64: SSE2, 16-byte vectors): the variant
// every machine runs. File names order the link (isa_0 < isa_1 < isa_2): where the variants share
// an inline library function, the linker keeps the first copy, this baseline one (kernels/prelude.h).
#include "kernel_table.h"
#include "kernels/prelude.h"

#define LAVAE_ISA baseline
#define LAVAE_ISA_LEVEL 0
#define LAVAE_ISA_NAME "default"
#include "kernels/all.inc"
#include "kernels/table.inc"
