// sanitizer_canary.cpp: deliberate undefined behaviour (`ubsan`: signed overflow) or a heap
// overflow (`asan`), to check that a sanitized build treats a report as fatal. Built and run by
// ctest only with WKV_SANITIZE=ON, where it must die right after the report.
#include <climits>
#include <cstdio>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
  volatile int n = argc;  // opaque to the optimiser
  if (argc > 1 && std::strcmp(argv[1], "ubsan") == 0) {
    int x = INT_MAX;
    x += n;  // signed overflow
    std::printf("%d\n", x);
  } else {
    std::vector<int> v(4);
    volatile int* p = v.data();
    std::printf("%d\n", p[4 + n - 2]);  // one past the end
  }
  std::printf("continued after the report\n");
  return 0;
}
