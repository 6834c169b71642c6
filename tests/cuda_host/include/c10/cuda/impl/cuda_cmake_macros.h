// Stand-in for the header a CUDA build of torch generates and the CPU wheel lacks; used only by
// .ci/check_cuda.sh to compile csrc/ against the CPU wheel's headers. Never on a real build's path.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
