// test_main.cpp: runs every registered WKV_TEST (optionally only those whose name contains argv[1]).
#include <cstdio>
#include <cstring>
#include <exception>

#include "harness.h"

extern "C" int wkv_core_abi_version();  // forces libweightedkv_core (the op registrations) to load

namespace wkv_test {
static int g_failures = 0;
std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}
void fail(const char* file, int line, const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "  FAIL %s:%d: %s\n", file, line, what.c_str());
}
}  // namespace wkv_test

int main(int argc, char** argv) {
  if (wkv_core_abi_version() != 1) return 2;
  int failed_cases = 0, run = 0;
  for (const auto& c : wkv_test::registry()) {
    if (argc > 1 && std::strstr(c.name, argv[1]) == nullptr) continue;
    const int before = wkv_test::g_failures;
    try {
      c.fn();
    } catch (const std::exception& e) {
      wkv_test::fail(__FILE__, __LINE__, std::string("exception: ") + e.what());
    }
    ++run;
    const bool ok = wkv_test::g_failures == before;
    failed_cases += !ok;
    std::printf("[%s] %s\n", ok ? " OK " : "FAIL", c.name);
  }
  std::printf("%d/%d tests passed\n", run - failed_cases, run);
  return failed_cases == 0 && run > 0 ? 0 : 1;
}
