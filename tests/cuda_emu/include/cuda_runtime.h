// Shim for tests/cuda_emu: the CUDA runtime, fp16 and bf16 types as the emulator provides them.
#pragma once
#include "specee_emu.h"
