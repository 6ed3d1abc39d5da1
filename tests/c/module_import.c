/* The Swift package's module map, proven without Swift: import the CPhi4 module with clang -fmodules and call the library through it. */
#pragma clang module import CPhi4
#include <stdio.h>
int main(int argc, char **argv) {
    phi4_model *m = NULL;
    phi4_status st = phi4_model_load(argc > 1 ? argv[1] : "", NULL, &m);
    printf("phi4 %s via module CPhi4: load %s\n", phi4_version(), st == PHI4_OK ? "ok" : phi4_last_load_error());
    phi4_model_free(m);
    return st != PHI4_OK;
}
