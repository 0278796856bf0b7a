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

void emu_run_cluster(EmuBlock& b, unsigned threads, unsigned cluster, uint3 first, dim3 grid, dim3 block) {
  const unsigned n = threads * cluster;
  while (g_stacks.size() < n) g_stacks.push_back(static_cast<char*>(std::malloc(kStack)));
  b.fibers.assign(n, EmuFiber{});
  b.shfl.assign((n / 32) * 32, 0.0f);
  b.scratch.assign(cluster, std::vector<char>(kEmuBlockScratch, 0));
  emu_block = &b;
  gridDim = grid; blockDim = block;
  for (unsigned t = 0; t < n; ++t) {
    EmuFiber& f = b.fibers[t];
    f.tid = t % threads; f.gid = t; f.block = t / threads; f.shared_used = 0; f.state = 0; f.stack = g_stacks[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  const unsigned warps = n / 32;
  // Releases the fibers in [begin, end) waiting in `state` if every live one of them waits there.
  auto release_if_all = [&](unsigned begin, unsigned end, int state) {
    bool any = false;
    for (unsigned t = begin; t < end; ++t) {
      const int s = b.fibers[t].state;
      if (s == state) any = true;
      else if (s != 3) return false;
    }
    if (!any) return false;
    for (unsigned t = begin; t < end; ++t) if (b.fibers[t].state == state) b.fibers[t].state = 0;
    return true;
  };
  for (;;) {
    for (unsigned t = 0; t < n; ++t) {
      EmuFiber& f = b.fibers[t];
      if (f.state != 0) continue;
      b.cur = &f;
      threadIdx = uint3{f.tid, 0, 0};
      blockIdx = uint3{first.x + f.block, first.y, first.z};
      swapcontext(&b.sched, &f.ctx);
    }
    bool all_done = true;
    for (auto& f : b.fibers) if (f.state != 3) all_done = false;
    if (all_done) break;
    bool released = false;
    for (unsigned w = 0; w < warps; ++w) released |= release_if_all(w * 32, w * 32 + 32, 2);
    if (!released) {
      for (unsigned k = 0; k < cluster; ++k) released |= release_if_all(k * threads, (k + 1) * threads, 1);
    }
    if (!released) released = release_if_all(0, n, 4);
    if (!released) {
      std::fprintf(stderr, "emu: deadlock in cluster at block (%u,%u)\n", first.x, first.y);
      std::abort();
    }
  }
}
