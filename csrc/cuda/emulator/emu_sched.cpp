// The fiber scheduler of the CPU emulator (see fake_cuda/emu_runtime.h).
#include "emu_runtime.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
EmuBlock* emu_block;

static constexpr size_t kStack = 128 * 1024;
static std::vector<char*> g_stacks;

static void trampoline() {
  emu_block->body();
  emu_block->cur->state = 3;
  swapcontext(&emu_block->cur->ctx, &emu_block->sched);
}

void emu_run_block(EmuBlock& b, unsigned n, uint3 bidx, dim3 grid, dim3 block) {
  while (g_stacks.size() < n) g_stacks.push_back(static_cast<char*>(std::malloc(kStack)));
  b.fibers.assign(n, EmuFiber{});
  b.shfl.assign((n / 32) * 32, 0.0f);
  emu_block = &b;
  blockIdx = bidx; gridDim = grid; blockDim = block;
  for (unsigned t = 0; t < n; ++t) {
    EmuFiber& f = b.fibers[t];
    f.tid = t; f.state = 0; f.stack = g_stacks[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  const unsigned warps = n / 32;
  for (;;) {
    for (unsigned t = 0; t < n; ++t) {
      EmuFiber& f = b.fibers[t];
      if (f.state != 0) continue;
      b.cur = &f;
      threadIdx = uint3{t, 0, 0};
      swapcontext(&b.sched, &f.ctx);
    }
    bool all_done = true, released = false;
    bool block_wait = true;  // every live fiber waits on the block barrier
    for (auto& f : b.fibers) {
      if (f.state != 3) all_done = false;
      if (f.state != 3 && f.state != 1) block_wait = false;
    }
    if (all_done) break;
    for (unsigned w = 0; w < warps; ++w) {
      bool any = false, all = true;
      for (unsigned l = 0; l < 32; ++l) {
        int s = b.fibers[w * 32 + l].state;
        if (s == 2) any = true;
        else if (s != 3) all = false;
      }
      if (any && all) {
        for (unsigned l = 0; l < 32; ++l) if (b.fibers[w * 32 + l].state == 2) b.fibers[w * 32 + l].state = 0;
        released = true;
      }
    }
    if (!released && block_wait) {
      for (auto& f : b.fibers) if (f.state == 1) f.state = 0;
      released = true;
    }
    if (!released) { std::fprintf(stderr, "emu: deadlock in block (%u,%u)\n", bidx.x, bidx.y); std::abort(); }
  }
}
