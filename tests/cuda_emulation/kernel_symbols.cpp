// Reads /proc/self/exe's ELF symbol table (see kernel_symbols.h). The emulation executable is built
// without stripping, so every function and every function-local static has a symbol; a static local
// v of function f is mangled "_ZZ" + (f's mangled name without "_Z") + "E" + <v>.
#include "kernel_symbols.h"

#include <cxxabi.h>
#include <elf.h>
#include <link.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace pvq_emulation {
namespace {

struct Symbol {
  std::string name;
  uintptr_t address;  // at run time
  size_t size;
  bool writable;
};

struct SymbolTable {
  std::map<uintptr_t, std::string> functions;  // address -> mangled name
  std::vector<Symbol> statics;                  // writable function-local statics ("_ZZ...")
};

int find_main_program_bias(dl_phdr_info* info, size_t, void* out) {
  *static_cast<uintptr_t*>(out) = info->dlpi_addr;  // the first object listed is the executable
  return 1;
}

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "pvq-emulation: cannot read the executable's symbols: %s\n", what);
  std::_Exit(70);
}

SymbolTable read_symbols() {
  std::ifstream file("/proc/self/exe", std::ios::binary);
  const std::vector<char> image((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (image.size() < sizeof(Elf64_Ehdr)) die("not an ELF file");
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(image.data());
  if (std::memcmp(header->e_ident, ELFMAG, SELFMAG) != 0 || header->e_ident[EI_CLASS] != ELFCLASS64)
    die("not a 64-bit ELF file");
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image.data() + header->e_shoff);
  uintptr_t bias = 0;
  dl_iterate_phdr(find_main_program_bias, &bias);

  SymbolTable table;
  for (int s = 0; s < header->e_shnum; ++s) {
    if (sections[s].sh_type != SHT_SYMTAB) continue;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(image.data() + sections[s].sh_offset);
    const char* names = image.data() + sections[sections[s].sh_link].sh_offset;
    const size_t count = sections[s].sh_size / sizeof(Elf64_Sym);
    for (size_t i = 0; i < count; ++i) {
      const Elf64_Sym& sym = symbols[i];
      if (sym.st_shndx == SHN_UNDEF || sym.st_shndx >= header->e_shnum) continue;
      const char* name = names + sym.st_name;
      const uintptr_t address = bias + sym.st_value;
      if (ELF64_ST_TYPE(sym.st_info) == STT_FUNC) {
        table.functions.emplace(address, name);
      } else if (ELF64_ST_TYPE(sym.st_info) == STT_OBJECT && std::strncmp(name, "_ZZ", 3) == 0 && sym.st_size > 0) {
        const bool writable = (sections[sym.st_shndx].sh_flags & SHF_WRITE) != 0;
        table.statics.push_back(Symbol{name, address, size_t(sym.st_size), writable});
      }
    }
  }
  if (table.functions.empty()) die("no symbol table (was the emulation executable stripped?)");
  return table;
}

std::string demangle(const std::string& mangled) {
  int status = 0;
  char* text = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  std::string out = status == 0 && text != nullptr ? text : mangled;
  std::free(text);
  return out;
}

// The bytes of a static a program may touch. Under AddressSanitizer a global's symbol covers the
// variable and its trailing redzone; the redzone is the poisoned part.
size_t usable_bytes(uintptr_t address, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
  void* const bad = __asan_region_is_poisoned(reinterpret_cast<void*>(address), size);
  if (bad != nullptr) return static_cast<char*>(bad) - reinterpret_cast<char*>(address);
#endif
  return size;
}

}  // namespace

const KernelSymbols& kernel_symbols(const void* kernel) {
  static std::mutex mutex;
  static const SymbolTable* table = nullptr;
  static std::map<const void*, KernelSymbols>* cache = nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  if (table == nullptr) {
    table = new SymbolTable(read_symbols());
    cache = new std::map<const void*, KernelSymbols>;
  }
  auto found = cache->find(kernel);
  if (found != cache->end()) return found->second;

  KernelSymbols info;
  const auto function = table->functions.find(reinterpret_cast<uintptr_t>(kernel));
  if (function == table->functions.end()) {
    std::fprintf(stderr, "pvq-emulation: no function symbol at kernel address %p\n", kernel);
    std::_Exit(70);
  }
  const std::string& mangled = function->second;
  info.name = demangle(mangled);
  if (mangled.rfind("_Z", 0) == 0) {
    const std::string prefix = "_ZZ" + mangled.substr(2) + "E";
    for (const Symbol& s : table->statics) {
      if (!s.writable || s.name.rfind(prefix, 0) != 0) continue;
      const size_t bytes = usable_bytes(s.address, s.size);
      info.shared.push_back(SharedVariable{reinterpret_cast<void*>(s.address), bytes});
      info.static_smem += bytes;
    }
  }
  return cache->emplace(kernel, std::move(info)).first->second;
}

}  // namespace pvq_emulation
