// One chat turn with the C++ wrapper: ./chat MODEL.gguf "question"
#include "phi4.hpp"

#include <iostream>

int main(int argc, char **argv) {
    if (argc != 3) {
        std::cerr << "usage: " << argv[0] << " MODEL.gguf QUESTION\n";
        return 2;
    }
    try {
        phi4::Model model(argv[1]);
        phi4::Session session(model);
        phi4_generate_params gp;
        phi4_generate_default_params(&gp);
        gp.temperature = 0;
        auto result = session.chat({{"user", argv[2]}}, [](std::string_view piece) {
            std::cout << piece << std::flush;
            return true;
        }, &gp);
        std::cout << "\n";
        std::cerr << result.eval_count << " tokens, done reason " << result.done_reason << "\n";
        // Errors are exceptions:
        try {
            phi4::Model missing("/nonexistent.gguf");
        } catch (const phi4::Error &e) {
            std::cerr << "expected error (" << e.status() << "): " << e.what() << "\n";
        }
    } catch (const phi4::Error &e) {
        std::cerr << "error: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
