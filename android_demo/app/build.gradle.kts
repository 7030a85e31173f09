// The demo app for app teams. `pocketformer build RECIPE` runs before preBuild; its ONNX
// artifact and the tokenizer's vocabulary are written into the app's assets, and the app build
// fails when pocketformer exits 3 (a budget or gate failed: size, latency, quality, parity).
// Exit 2 (bad recipe/model/data) and 4 (runtime failure) fail it too, with their own message.
//
// Unverified here: the pocketformer CI machine has no Android SDK/NDK/Gradle. What was checked
// instead is in android_demo/README.md.
import java.io.ByteArrayOutputStream

plugins {
    id("com.android.application")
}

val pfRecipe = providers.gradleProperty("pocketformer.recipe").get()
val pfExe = providers.gradleProperty("pocketformer.exe").getOrElse("pocketformer")
val pfPython = providers.gradleProperty("pocketformer.python").getOrElse("python3")
val ortVersion = providers.gradleProperty("pocketformer.onnxruntimeVersion").get()
val etVersion = providers.gradleProperty("pocketformer.executorchVersion").get()
val withExecuTorch = providers.gradleProperty("pocketformer.executorch").getOrElse("false").toBoolean()
val pfOut = layout.buildDirectory.dir("pocketformer/build")
val pfAssets = layout.buildDirectory.dir("pocketformer/assets")

android {
    namespace = "com.pocketformer.demo"
    compileSdk = 34
    ndkVersion = "27.2.12479018"

    defaultConfig {
        applicationId = "com.pocketformer.demo"
        minSdk = 24
        targetSdk = 34
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a") }
        externalNativeBuild { cmake { arguments += listOf("-DANDROID_STL=none") } }
    }
    buildFeatures { prefab = true }          // onnxruntime-android ships headers + .so as prefab
    externalNativeBuild {
        cmake {
            path = file("src/main/cpp/CMakeLists.txt")
            version = "3.22.1"
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_1_8
        targetCompatibility = JavaVersion.VERSION_1_8
    }
    // Same packaging as the Gradle-free APK: the model stored (the app maps it out of the
    // APK), native libraries compressed and extracted at install.
    androidResources { noCompress += listOf("onnx", "pte") }
    packaging { jniLibs { useLegacyPackaging = true } }
    sourceSets["main"].assets.srcDir(pfAssets)
    if (withExecuTorch) sourceSets["main"].java.srcDir("src/executorch/java")
    // HostCheck (src/test/java) is the host-JVM driver pocketformer's tests use; it has no
    // JUnit tests, so Gradle's unit-test task simply compiles it.
}

dependencies {
    // Our JNI layer (src/main/cpp/ort_jni.c) links this AAR's libonnxruntime.so via prefab;
    // the AAR's Java API is not used.
    implementation("com.microsoft.onnxruntime:onnxruntime-android:$ortVersion")
    if (withExecuTorch) implementation("org.pytorch:executorch-android:$etVersion")
}

val pocketformerBuild by tasks.registering(Exec::class) {
    group = "pocketformer"
    description = "Runs `pocketformer build <recipe>`; exit 3 (budget) fails the app build."
    val recipe = rootProject.file(pfRecipe)
    inputs.file(recipe)
    outputs.dir(pfOut)
    commandLine(pfExe, "build", recipe.absolutePath, "--out", pfOut.get().asFile.absolutePath)
    isIgnoreExitValue = true
    val err = ByteArrayOutputStream()
    errorOutput = err
    doLast {
        val rc = executionResult.get().exitValue
        val tail = err.toString().takeLast(2000)
        when (rc) {
            0 -> {}
            3 -> throw GradleException(
                "pocketformer build: a budget failed (exit 3); the app is not built. See " +
                    "${pfOut.get().asFile}/report.md\n$tail")
            2 -> throw GradleException("pocketformer build: bad recipe/model/data (exit 2)\n$tail")
            else -> throw GradleException("pocketformer build failed (exit $rc)\n$tail")
        }
    }
}

val pocketformerAssets by tasks.registering(Exec::class) {
    group = "pocketformer"
    description = "Writes the app's assets from the build output: the ONNX model, vocab.txt " +
        "(derived from the build's tokenizer.json) and pocketformer_app.properties."
    dependsOn(pocketformerBuild)
    inputs.dir(pfOut)
    outputs.dir(pfAssets)
    // The same code as the Gradle-free APK build (pocketformer/android.py: find_demo_inputs,
    // write_assets): it refuses (exit 2) an artifact or tokenizer the app cannot use.
    doFirst { pfAssets.get().asFile.deleteRecursively() }
    commandLine(pfPython, "-m", "pocketformer.android", "assets",
                pfOut.get().asFile.absolutePath, pfAssets.get().asFile.absolutePath)
    if (withExecuTorch) doLast {
        pfOut.get().dir("artifacts").asFile.listFiles { f -> f.name.endsWith(".pte") }.orEmpty()
            .forEach { it.copyTo(File(pfAssets.get().asFile, it.name), overwrite = true) }
    }
}

tasks.named("preBuild") { dependsOn(pocketformerAssets) }
